"""Which measurement mode the noise monitor uses: one rule for the monitor and the trainer.

Core module: the standard library only.
"""

from __future__ import annotations

__all__ = ["select_mode"]


def select_mode(*, sharded: bool = False, ddp: bool = False, accum_steps: int | None = None) -> str:
    """The mode ``"auto"`` stands for.

    ``sharded``: the model is an FSDP2 (``fully_shard``) model -> ``"fsdp"``.
    ``ddp``: a DistributedDataParallel model on more than one rank -> ``"ddp"``.
    Otherwise one process: ``"accumulation"`` when a step has two or more micro-batches (or the
    caller does not say, ``accum_steps=None``), else ``"split"`` (the one micro-batch is cut in
    two, the only way to see two batch sizes without a second backward pass).
    Call it again when the batch changes: the number of micro-batches per step may have too.
    """
    if sharded:
        return "fsdp"
    if ddp:
        return "ddp"
    if accum_steps is None or accum_steps > 1:
        return "accumulation"
    return "split"

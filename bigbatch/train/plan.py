"""How a global batch is realised: micro-batch × accumulation steps × world size."""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch._checks import check_int_positive

__all__ = ["BatchPlan", "plan_batch"]


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """How a global batch is realised: ``batch = micro × accum × world``."""

    batch_size: int
    micro_batch_size: int
    accum_steps: int
    world_size: int


def plan_batch(batch_size: int, world_size: int, micro_batch_size: int | None) -> BatchPlan:
    """Split ``batch_size`` over ranks and accumulation steps, or say which option is wrong.

    ``micro_batch_size=None`` means one micro-batch per rank and step. A micro-batch larger than
    the per-rank batch is an error, never shrunk: the adaptive controllers are built with a
    granularity of micro-batch × world size, so a batch they choose always holds a whole number
    of micro-batches and can only fail here if the user's own sizes disagree.
    """
    batch_size = check_int_positive("batch_size", batch_size)
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the world size {world_size}")
    per_rank = batch_size // world_size
    micro = per_rank if micro_batch_size is None else check_int_positive("micro_batch_size", micro_batch_size)
    if micro > per_rank:
        raise ValueError(
            f"--micro-batch-size {micro} is larger than the per-rank batch {per_rank} "
            f"(batch size {batch_size} over {world_size} rank(s)); use a micro-batch <= {per_rank}"
        )
    if per_rank % micro:
        raise ValueError(
            f"--micro-batch-size {micro} does not divide the per-rank batch {per_rank} "
            f"(batch size {batch_size} over {world_size} rank(s))"
        )
    return BatchPlan(batch_size, micro, per_rank // micro, world_size)

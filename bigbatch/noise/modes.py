"""Where ``NoiseMonitor`` gets its two batch sizes: one small class per measurement mode.

A mode decides what a measured step reads and when; the monitor around it owns what all modes
share (the step's bookkeeping, the all-reduce, the estimators, the host side). The interface:

* ``attach()`` / ``detach()``: put on / take off what reads gradients, only for measured steps
  (a tensor hook costs a Python call per parameter per micro-batch even when it does nothing);
* ``pieces(batch, measured)``: the micro-batches a loop should run for one of its own (split mode
  cuts it on measured steps only; the others run it whole, at full speed);
* ``micro_done(mb, norms)``: after one micro-batch's backward (``norms``: what the hooks read);
* ``readings()``: at the end of the step, the big batch's per-group squared norms and the
  small-batch readings ``[(raw [G], count, loss scale)]``, or None when the step gives nothing.

:func:`select_mode` is the one rule for ``mode="auto"``, used by the monitor and the trainer.
Core module: torch and the standard library only.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from bigbatch.noise.fsdp import UnshardedGradHooks, check_sharded, local_grads
from bigbatch.noise.sums import flat_norm, norm_dtype, split_batch

if TYPE_CHECKING:
    from bigbatch.noise.monitor import NoiseMonitor, _MicroBatch

__all__ = ["select_mode", "Mode", "AccumulationMode", "SplitMode", "DDPMode", "FSDPMode", "MODES"]

Reading = tuple[torch.Tensor, Any, Any]  # (raw per-group squared norms [G], count, loss scale)


def select_mode(*, sharded: bool = False, ddp: bool = False, accum_steps: int | None = None) -> str:
    """The mode ``"auto"`` stands for.

    ``sharded``: the model is an FSDP2 (``fully_shard``) model -> ``"fsdp"``.
    ``ddp``: a DistributedDataParallel model on more than one rank -> ``"ddp"``.
    Otherwise one process: ``"accumulation"`` when a step has two or more micro-batches (or the
    caller does not say, ``accum_steps=None``), else ``"split"`` (the one micro-batch is cut in
    two, the only way to see two batch sizes without a second backward pass).
    Call it again when the batch changes: the number of micro-batches per step may have too
    (``NoiseMonitor.set_mode`` switches between ``"accumulation"`` and ``"split"``).
    """
    if sharded:
        return "fsdp"
    if ddp:
        return "ddp"
    if accum_steps is None or accum_steps > 1:
        return "accumulation"
    return "split"


class Mode:
    """The interface (see the module docstring); the base reads nothing."""

    name = ""
    splits = 1

    def __init__(self, monitor: "NoiseMonitor") -> None:
        self.mon = monitor

    def attach(self) -> None:
        """Start reading gradients (a measured step begins)."""

    def detach(self) -> None:
        """Stop reading gradients."""

    def pieces(self, batch: Mapping[str, torch.Tensor], measured: bool) -> list[dict[str, torch.Tensor]]:
        return [dict(batch)]

    def grads(self) -> list[torch.Tensor | None]:
        """The reduced gradient of each of the monitor's parameters (this rank's part of it)."""
        return [p.grad for p in self.mon._params]

    def micro_done(self, mb: "_MicroBatch", norms: list[torch.Tensor]) -> None:
        pass

    def readings(self) -> tuple[torch.Tensor, list[Reading]] | None:
        raise NotImplementedError

    def check_step(self) -> None:
        """Raise if the step cannot have been read as this mode expects."""


class AccumulationMode(Mode):
    """Each micro-batch's gradient (``source="micro"``) or each prefix of them (``"prefix"``)
    against the accumulated gradient of the step."""

    name = "accumulation"

    def __init__(self, monitor: "NoiseMonitor", source: str) -> None:
        super().__init__(monitor)
        self.source = source
        self._handles: list[Any] = []
        self._micro: list[Reading] = []
        self._prefix: list[Reading] = []  # (raw [G], cumulative count, loss scale)

    def attach(self) -> None:
        self._micro, self._prefix = [], []
        if self.source == "micro":
            mon = self.mon
            self._handles = [p.register_hook(mon._make_hook(g)) for p, g in zip(mon._params, mon._group_index)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def micro_done(self, mb: "_MicroBatch", norms: list[torch.Tensor]) -> None:
        mon = self.mon
        if self.source == "prefix":
            # .grad now holds (loss scale)·Σ of the first m_j units' gradients: a batch of m_j.
            vec = mon._grad_sqnorms()
            if vec is not None:
                self._prefix.append((vec, mon._count_local, mb.loss_scale))
            return
        if not norms:
            return
        if not isinstance(mb.count, torch.Tensor) and mb.count == 0:
            return  # an empty micro-batch carries no gradient and no information
        self._micro.append((mon._group_sum(torch.stack(norms).square(), tuple(mon._hook_groups)), mb.count, mb.loss_scale))

    def check_step(self) -> None:
        if self.source == "prefix":
            _common_scale(self.mon._scales, self.name, self.source)

    def readings(self) -> tuple[torch.Tensor, list[Reading]] | None:
        if self.source == "prefix":
            if not self._prefix:
                return None
            big = self._prefix[-1][0]  # after the last backward: the whole (reduced) gradient
            return big, [r for r in self._prefix[:-1] if isinstance(r[1], torch.Tensor) or r[1] > 0]
        big = self.mon._grad_sqnorms()
        return None if big is None else (big, self._micro)


class SplitMode(AccumulationMode):
    """One process, one micro-batch: the loop runs ``splits`` pieces of it on measured steps,
    which makes them accumulation steps; unmeasured steps run the batch whole."""

    name = "split"

    def __init__(self, monitor: "NoiseMonitor", source: str, splits: int) -> None:
        super().__init__(monitor, source)
        if monitor.world_size > 1:
            raise ValueError("mode='split' is for one process; under DDP use 'ddp' or 'accumulation'")
        if splits < 2:
            raise ValueError(f"splits must be >= 2 in split mode, got {splits}")
        self.splits = splits

    def pieces(self, batch: Mapping[str, torch.Tensor], measured: bool) -> list[dict[str, torch.Tensor]]:
        # Unmeasured steps are not cut: smaller kernels would cost time and read nothing.
        return split_batch(batch, self.splits) if measured else [dict(batch)]


class DDPMode(Mode):
    """Each rank's local gradient, read by a DDP communication hook before the bucket is
    all-reduced, against the reduced gradient."""

    name = "ddp"

    def __init__(self, monitor: "NoiseMonitor", model: Any, comm_hook: Callable[[Any, Any], Any] | None,
                 comm_state: Any) -> None:
        super().__init__(monitor)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        from bigbatch.noise.sums import comm_hook as reading_hook

        self.inner_hook = comm_hook or allreduce_hook
        self.inner_state = comm_state if comm_hook is not None else monitor.process_group
        self._bucket_raw: list[torch.Tensor] = []
        self._bucket_micro = 0
        self._multi_sync = False
        model.register_comm_hook(self, reading_hook)

    def attach(self) -> None:
        self._bucket_raw, self._bucket_micro, self._multi_sync = [], 0, False

    def read_bucket(self, bucket: Any) -> None:
        """Called by the comm hook with each bucket, before it is reduced."""
        mon = self.mon
        if not (mon._in_step and mon._measure and not mon._closed):
            return
        if self._bucket_raw and self._bucket_micro != mon._n_micro:
            self._multi_sync = True  # reduced in two backwards: no_sync was not used
        self._bucket_micro = mon._n_micro
        if len(mon.group_names) == 1:
            self._bucket_raw.append(flat_norm(bucket.buffer()).square().reshape(1))
        else:
            grads = list(bucket.gradients())
            sq = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype(grads[0]))).square()
            self._bucket_raw.append(mon._group_sum(sq, tuple(mon._group_of[id(p)] for p in bucket.parameters())))

    def check_step(self) -> None:
        _common_scale(self.mon._scales, self.name, self.mon.source)

    def readings(self) -> tuple[torch.Tensor, list[Reading]] | None:
        mon = self.mon
        big = mon._grad_sqnorms()
        if big is None:
            return None
        if self._multi_sync:
            warnings.warn("NoiseMonitor: DDP reduced gradients in more than one backward of a step; "
                          "run all micro-batches but the last under model.no_sync() (no reading this step)",
                          RuntimeWarning, stacklevel=4)
        if not self._bucket_raw or self._multi_sync:
            return None
        return big, [(torch.stack(self._bucket_raw).sum(0), mon._count_local, mon._step_scale)]


class FSDPMode(AccumulationMode):
    """FSDP2: each micro-batch's rank-local gradient, read by tensor hooks on the unsharded
    parameters (:mod:`bigbatch.noise.fsdp`), against the reduced gradient, whose squared norm
    is the sum over ranks of the local shards' squared norms (it rides along the all-reduce)."""

    name = "fsdp"
    reduce_big = True

    def __init__(self, monitor: "NoiseMonitor", inner: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        super().__init__(monitor, "micro")
        check_sharded([(n, p) for n, p in inner.named_parameters() if p.requires_grad], monitor.world_size)
        group_of = monitor._group_of
        slots = {(id(m), n): group_of[id(p)] for m in inner.modules()
                 for n, p in m.named_parameters(recurse=False) if id(p) in group_of}
        self.hooks = UnshardedGradHooks(units, slots, monitor._on_grad)
        self._hooked: int | None = None

    def attach(self) -> None:
        self._micro, self._hooked = [], None
        self.hooks.attach()  # hooks the unsharded parameters during the forward

    def detach(self) -> None:
        if self._hooked is None:
            self._hooked = self.hooks.n_hooked
        self.hooks.detach()

    def grads(self) -> list[torch.Tensor | None]:
        return local_grads(self.mon._params)

    def check_step(self) -> None:
        if self._hooked == 0:
            raise RuntimeError(
                f"NoiseMonitor(mode='fsdp') saw no unsharded parameter in the forward of FSDP's units with torch "
                f"{torch.__version__}: fully_shard no longer registers them on the modules in its forward pre-hook "
                "as in torch 2.11-2.13 (see bigbatch/noise/fsdp.py); run the forward through the root FSDP module, "
                "or use mode='accumulation' without FSDP")


MODES = ("accumulation", "ddp", "fsdp", "split")


def _common_scale(scales: list[Any], mode: str, source: str) -> None:
    """A prefix (or a rank's whole share) mixes micro-batches: they need one common loss scale."""
    numbers = [s for s in scales if s is not None and not isinstance(s, torch.Tensor)]
    if any(s != numbers[0] for s in numbers):
        raise ValueError(f"loss_scale must be the same for every micro_batch of a step in {mode} mode "
                         f"with source={source!r}, got {numbers}")

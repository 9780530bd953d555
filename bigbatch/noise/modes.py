"""Where ``NoiseMonitor`` gets its two batch sizes: one small class per measurement mode.

A mode decides what a measured step reads and when; the monitor around it owns what all modes
share (the step's bookkeeping, the all-reduce, the estimators, the host side). The interface:

* ``attach()`` / ``detach()``: put on / take off what reads gradients, only for measured steps
  (a tensor hook costs a Python call per parameter per micro-batch even when it does nothing);
* ``pieces(batch, measured)``: the micro-batches a loop should run for one of its own (split mode
  cuts it on measured steps only; the others run it whole, at full speed);
* ``micro_done(count, loss_scale, norms)``: after one micro-batch's backward (``norms``: what the
  hooks read);
* ``readings()``: at the end of the step, the big batch's per-group squared norms and the
  small-batch readings ``[(raw [G], Σ a_j n_j, Σ a_j² n_j)]`` (the sums over the micro-batches in
  each reading, :mod:`bigbatch.noise.context`), or None when the step gives nothing.

A mode is built on the monitor's :class:`~bigbatch.noise.context.StepContext` and reads nothing
else of it.

:func:`select_mode` is the one rule for ``mode="auto"``, used by the monitor and the trainer.
Core module: torch and the standard library only.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import torch

from bigbatch.noise.context import StepContext, unit_sums
from bigbatch.noise.fsdp import UnshardedGradHooks, check_sharded, local_grads
from bigbatch.noise.sums import flat_norm, norm_dtype, split_batch

__all__ = ["select_mode", "Mode", "AccumulationMode", "SplitMode", "DDPMode", "FSDPMode", "MODES"]

Reading = tuple[torch.Tensor, Any, Any]  # (raw per-group squared norms [G], Σ a_j n_j, Σ a_j² n_j)


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
    reduce_big = False  # the big batch's squared norms are per-rank parts, summed by the all-reduce

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def attach(self) -> None:
        """Start reading gradients (a measured step begins)."""

    def detach(self) -> None:
        """Stop reading gradients."""

    def pieces(self, batch: Mapping[str, torch.Tensor], measured: bool) -> list[dict[str, torch.Tensor]]:
        return [dict(batch)]

    def grads(self) -> list[torch.Tensor | None]:
        """The reduced gradient of each of the monitor's parameters (this rank's part of it)."""
        return [p.grad for p in self.ctx.groups.params]

    def grad_sqnorms(self) -> torch.Tensor | None:
        """Per-group squared norms of :meth:`grads` (None when no parameter has a gradient)."""
        return self.ctx.groups.sqnorms(self.grads())

    def micro_done(self, count: Any, loss_scale: Any, norms: list[torch.Tensor]) -> None:
        pass

    def readings(self) -> tuple[torch.Tensor, list[Reading]] | None:
        raise NotImplementedError

    def check_step(self) -> None:
        """Raise if the step cannot have been read as this mode expects."""


class AccumulationMode(Mode):
    """Each micro-batch's gradient (``source="micro"``) or each prefix of them (``"prefix"``)
    against the accumulated gradient of the step."""

    name = "accumulation"

    def __init__(self, ctx: StepContext, source: str) -> None:
        super().__init__(ctx)
        self.source = source
        self._handles: list[Any] = []
        self._micro: list[Reading] = []
        self._prefix: list[Reading] = []  # (raw [G], Σ a n, Σ a² n of the first j micro-batches)

    def attach(self) -> None:
        self._micro, self._prefix = [], []
        if self.source == "micro":
            groups = self.ctx.groups
            self._handles = [p.register_hook(self.ctx.make_hook(g)) for p, g in zip(groups.params, groups.index)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def micro_done(self, count: Any, loss_scale: Any, norms: list[torch.Tensor]) -> None:
        ctx = self.ctx
        if self.source == "prefix":
            # .grad now holds Σ_{i<=j} a_i·S_i: the first j micro-batches, whatever their factors.
            vec = self.grad_sqnorms()
            if vec is not None:
                self._prefix.append((vec, ctx.unit_sum, ctx.unit_sqsum))
            return
        if not norms:
            return
        if not isinstance(count, torch.Tensor) and count == 0:
            return  # an empty micro-batch carries no gradient and no information
        a, q = unit_sums(count, loss_scale)
        self._micro.append((ctx.groups.sum(torch.stack(norms).square(), tuple(ctx.norm_groups)), a, q))

    def readings(self) -> tuple[torch.Tensor, list[Reading]] | None:
        if self.source == "prefix":
            if not self._prefix:
                return None
            big = self._prefix[-1][0]  # after the last backward: the whole (reduced) gradient
            return big, [r for r in self._prefix[:-1] if isinstance(r[1], torch.Tensor) or r[1] > 0]
        big = self.grad_sqnorms()
        return None if big is None else (big, self._micro)


class SplitMode(AccumulationMode):
    """One process, one micro-batch: the loop runs ``splits`` pieces of it on measured steps,
    which makes them accumulation steps; unmeasured steps run the batch whole."""

    name = "split"

    def __init__(self, ctx: StepContext, source: str, splits: int) -> None:
        super().__init__(ctx, source)
        if ctx.world_size > 1:
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

    def __init__(self, ctx: StepContext, model: Any, comm_hook: Callable[[Any, Any], Any] | None,
                 comm_state: Any) -> None:
        super().__init__(ctx)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        from bigbatch.noise.sums import comm_hook as reading_hook

        self.inner_hook = comm_hook or allreduce_hook
        self.inner_state = comm_state if comm_hook is not None else ctx.process_group
        self._bucket_raw: list[torch.Tensor] = []
        self._bucket_micro = 0
        self._multi_sync = False
        model.register_comm_hook(self, reading_hook)

    def attach(self) -> None:
        self._bucket_raw, self._bucket_micro, self._multi_sync = [], 0, False

    def read_bucket(self, bucket: Any) -> None:
        """Called by the comm hook with each bucket, before it is reduced."""
        ctx = self.ctx
        if not ctx.measuring:
            return
        if self._bucket_raw and self._bucket_micro != ctx.n_micro:
            self._multi_sync = True  # reduced in two backwards: no_sync was not used
        self._bucket_micro = ctx.n_micro
        groups = ctx.groups
        if len(groups.names) == 1:
            self._bucket_raw.append(flat_norm(bucket.buffer()).square().reshape(1))
        else:
            grads = list(bucket.gradients())
            sq = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype(grads[0]))).square()
            self._bucket_raw.append(groups.sum(sq, tuple(groups.of[id(p)] for p in bucket.parameters())))

    def readings(self) -> tuple[torch.Tensor, list[Reading]] | None:
        ctx = self.ctx
        big = self.grad_sqnorms()
        if big is None:
            return None
        if self._multi_sync:
            warnings.warn("NoiseMonitor: DDP reduced gradients in more than one backward of a step; "
                          "run all micro-batches but the last under model.no_sync() (no reading this step)",
                          RuntimeWarning, stacklevel=4)
        if not self._bucket_raw or self._multi_sync:
            return None
        # The rank's whole share, Σ_j a_j·S_j over its micro-batches: one reading with the step's sums.
        return big, [(torch.stack(self._bucket_raw).sum(0), ctx.unit_sum, ctx.unit_sqsum)]


class FSDPMode(AccumulationMode):
    """FSDP2: each micro-batch's rank-local gradient, read by tensor hooks on the unsharded
    parameters (:mod:`bigbatch.noise.fsdp`), against the reduced gradient, whose squared norm
    is the sum over ranks of the local shards' squared norms (it rides along the all-reduce)."""

    name = "fsdp"
    reduce_big = True

    def __init__(self, ctx: StepContext, inner: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        super().__init__(ctx, "micro")
        check_sharded([(n, p) for n, p in inner.named_parameters() if p.requires_grad], ctx.world_size)
        group_of = ctx.groups.of
        slots = {(id(m), n): group_of[id(p)] for m in inner.modules()
                 for n, p in m.named_parameters(recurse=False) if id(p) in group_of}
        self.hooks = UnshardedGradHooks(units, slots, ctx.on_grad)
        self._hooked: int | None = None

    def attach(self) -> None:
        self._micro, self._hooked = [], None
        self.hooks.attach()  # hooks the unsharded parameters during the forward

    def detach(self) -> None:
        if self._hooked is None:
            self._hooked = self.hooks.n_hooked
        self.hooks.detach()

    def grads(self) -> list[torch.Tensor | None]:
        return local_grads(self.ctx.groups.params)

    def check_step(self) -> None:
        if self._hooked == 0:
            raise RuntimeError(
                f"NoiseMonitor(mode='fsdp') saw no unsharded parameter in the forward of FSDP's units with torch "
                f"{torch.__version__}: fully_shard no longer registers them on the modules in its forward pre-hook "
                "as in torch 2.11-2.13 (see bigbatch/noise/fsdp.py); run the forward through the root FSDP module, "
                "or use mode='accumulation' without FSDP")


MODES = ("accumulation", "ddp", "fsdp", "split")

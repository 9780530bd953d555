"""``NoiseMonitor``: measures B_simple during training without an extra backward pass.

McCandlish et al. 2018 (App. A.1) need squared gradient norms at two batch sizes. A training
step already computes gradients at two sizes, so the monitor only reads them:

* ``"accumulation"``: each micro-batch gradient (``source="micro"``: a tensor hook on every
  parameter sees it *before* it is added into ``.grad``, so no copy is stored; or
  ``source="prefix"``: the accumulated ``.grad`` after each micro-batch but the last) against
  the accumulated (and, under DDP, reduced) gradient of the step.
* ``"ddp"``: each rank's local gradient, read by a DDP communication hook just before the
  bucket is all-reduced, against the reduced gradient. One extra all-reduce of ``G + 6``
  floats per step (``G`` = number of groups).
* ``"fsdp"``: FSDP2 (``fully_shard``): each micro-batch's rank-local gradient, read by tensor
  hooks on the unsharded parameters before it is accumulated or reduce-scattered (see
  ``bigbatch.noise.fsdp``), against the reduced gradient, whose squared norm is the sum of the
  ranks' shard norms. One extra all-reduce of ``2G + 6`` floats per step.
* ``"split"``: one process, no accumulation: on measured steps the loop splits its batch in
  ``splits`` pieces (``monitor.split_batch``), which turns it into accumulation mode at the cost
  of smaller kernels; unmeasured steps run the batch whole.

Each mode is a small class in :mod:`bigbatch.noise.modes`; this module holds what they share.

The loop drives it explicitly (no callbacks: the order of events stays visible in the loop)::

    monitor.begin_step()
    for mb in monitor.split_batch(batch):           # or the loop's own micro-batches
        with monitor.micro_batch(count):          # count: units the loss is normalised by
            loss.backward()
    reading = monitor.end_step()                   # before optimizer.step()
    ...
    metrics.update(reading.as_dict())              # the first host sync, when logging

Nothing the optimizer sees is touched: hooks return ``None`` and the comm hook forwards the
bucket to the usual all-reduce. Per-step sums stay on the device; values reach the host only
when a reading is read (or every ``max_pending`` steps).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from bigbatch._checks import check_choice, check_int_positive, check_nonnegative
from bigbatch.noise.context import ParamGroups, StepContext, unit_sums
from bigbatch.noise.estimator import NoiseScale
from bigbatch.noise.fsdp import UnshardedGradHooks, fsdp_units
from bigbatch.noise.groups import GroupSpec, assign_groups
from bigbatch.noise.modes import AccumulationMode, DDPMode, FSDPMode, Mode, SplitMode, select_mode
from bigbatch.noise.reading import NoiseReading
from bigbatch.noise.sums import is_ddp, scalar as _scalar, split_batch, step_inputs

__all__ = ["NoiseMonitor", "split_batch"]

Number = int | float
_MODES = ("auto", "accumulation", "ddp", "fsdp", "split")
_SOURCES = ("prefix", "micro")


class _MicroBatch:
    __slots__ = ("mon", "count", "samples", "loss_scale")

    def __init__(self, mon: "NoiseMonitor", count: Any, samples: Any, loss_scale: Any) -> None:
        self.mon, self.count, self.samples, self.loss_scale = mon, count, samples, loss_scale

    def __enter__(self) -> "_MicroBatch":
        self.mon._open_micro()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.mon._close_micro(self, ok=exc_type is None)


class NoiseMonitor:
    """Feeds a :class:`NoiseScale` (and one per parameter group) from a training loop.

    Args:
        model: the module being trained, its ``DistributedDataParallel`` wrapper, or a model
            sharded in place with FSDP2's ``fully_shard``.
        mode: ``"auto"`` (:func:`~bigbatch.noise.modes.select_mode`: ``"ddp"`` for a DDP model on
            more than one rank, ``"fsdp"`` for an FSDP2 model, else ``"accumulation"`` — the
            monitor cannot know how many micro-batches a step will have; a caller that does,
            like the trainer, passes ``select_mode(accum_steps=...)``), ``"accumulation"``,
            ``"ddp"``, ``"fsdp"`` or ``"split"``. In ``"fsdp"`` mode the small batch is each micro-batch on each rank
            (``b_small`` = the rank's local batch without accumulation, the micro-batch with it:
            the harmonic mean over the step's readings, as in accumulation mode) and the big
            batch is the global batch.
        beta: EMA factor per step of the estimators.
        groups: per-group breakdown (see :data:`bigbatch.noise.groups.GroupSpec`).
        splits: pieces per batch in ``"split"`` mode (>= 2).
        source: small-batch gradients in accumulation/split mode. ``"prefix"``: the
            accumulated ``.grad`` after each micro-batch but the last — after ``j`` of them it
            is the mean gradient of the first ``m_j`` units, one fused norm per micro-batch.
            ``"micro"`` (default): each micro-batch's own gradient, read by a tensor hook on every
            parameter before it is added into ``.grad`` (independent readings, lower variance,
            but one norm launch per parameter per micro-batch: +2% on an H200 at GPT-2 small,
            +9% when the eager step is launch-bound; ``every=10`` brings it under 1%; see
            docs/bench_noise.md).
        process_group: for the reductions under DDP (default: the world).
        comm_hook, comm_state: in ``"ddp"`` mode, the communication hook that does the
            actual reduction (default: DDP's ``allreduce_hook``); DDP accepts one hook, so a
            user's own hook is wrapped here instead of registered.
        every: measure one step in ``every`` (steps are counted by ``begin_step``); the others
            cost nothing (no hooks attached, no collective). The EMA's ``beta`` is per reading.
        max_pending: readings kept on the device before the monitor syncs on its own.

    Loss normalisation: by default the gradient the optimizer sees is assumed to be the mean
    over all loss units of the step on all ranks (the bigbatch trainer's ``Σ loss / N``; also
    a per-rank mean under DDP with equal shards). Otherwise pass ``loss_scale`` — the factor
    the *summed* loss was multiplied by before ``backward`` (including a GradScaler's scale) —
    to every ``micro_batch`` of the step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "auto",
        beta: float = 0.99,
        groups: GroupSpec = None,
        splits: int = 2,
        source: str = "micro",
        process_group: Any = None,
        comm_hook: Callable[[Any, Any], Any] | None = None,
        comm_state: Any = None,
        every: int = 1,
        max_pending: int = 64,
    ) -> None:
        mode = check_choice("noise monitor mode", mode, _MODES)
        self.beta = beta
        self.estimator = NoiseScale(beta)
        self.max_pending = check_int_positive("max_pending", max_pending)
        self.every = check_int_positive("every", every)
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        ddp = is_ddp(model)
        inner = model.module if ddp else getattr(model, "_orig_mod", model)  # DDP, torch.compile
        units = fsdp_units(inner)
        if mode == "auto":
            mode = select_mode(sharded=bool(units), ddp=ddp and self.world_size > 1)
        if mode == "ddp" and not ddp:
            raise ValueError("mode='ddp' needs a DistributedDataParallel model; use 'accumulation' or 'split'")
        if units and mode != "fsdp":
            raise ValueError(f"an FSDP2 (fully_shard) model needs mode='fsdp' or 'auto', got {mode!r}")
        if mode == "fsdp" and not units:
            raise ValueError("mode='fsdp' needs a model sharded with torch.distributed.fsdp.fully_shard")
        if mode == "fsdp" and source != "micro":
            raise ValueError(f"mode='fsdp' reads each micro-batch's gradient (source='micro'), got source={source!r}")
        self.source = check_choice("noise monitor source", source, _SOURCES)
        if mode == "split":
            check_int_positive("splits", splits)
        self._splits = splits
        params, group_index, self.group_names = assign_groups(inner, groups)
        if not params:
            raise ValueError("model has no trainable parameters")
        # The step as the modes see it: they get this, never the monitor.
        self._ctx = StepContext(ParamGroups(params, group_index, self.group_names), self.world_size, process_group)
        self.group_estimators = {name: NoiseScale(beta) for name in self.group_names} if groups is not None else {}
        self._in_step = False
        self._closed = False
        self._pending: list[tuple[NoiseReading, dict[str, Any] | None]] = []
        self._step_index = 0
        self._warned: set[str] = set()
        self._ups_ema, self._ups_pow, self._ups_n = 0.0, 1.0, 0
        self._measure = False
        self._fsdp: UnshardedGradHooks | None = None
        self._mode: Mode
        if mode == "fsdp":
            self._mode = FSDPMode(self._ctx, inner, units)
            self._fsdp = self._mode.hooks
        elif mode == "ddp":
            self._mode = DDPMode(self._ctx, model, comm_hook, comm_state)
        else:
            self._mode = self._local_mode(mode)
        self._reset_step()

    def _local_mode(self, mode: str) -> Mode:
        return SplitMode(self._ctx, self.source, self._splits) if mode == "split" else AccumulationMode(self._ctx, self.source)

    @property
    def mode(self) -> str:
        """The measurement mode in use (``"auto"`` resolved)."""
        return self._mode.name

    @property
    def splits(self) -> int:
        """Pieces per measured batch: ``splits`` in split mode, else 1."""
        return self._mode.splits

    @property
    def _handles(self) -> list[Any]:
        """The parameter hooks attached now (only inside measured steps)."""
        return getattr(self._mode, "_handles", [])

    def set_mode(self, mode: str) -> None:
        """Switch between ``"accumulation"`` and ``"split"`` between steps, e.g. after the batch
        changed (``"auto"``: :func:`select_mode` cannot tell them apart without ``accum_steps``,
        so pass the mode it returns). The estimators carry on: both read the same statistics."""
        mode = check_choice("noise monitor mode", mode, ("accumulation", "split"))
        if self._in_step:
            raise RuntimeError("monitor.set_mode() inside a step; call it between end_step() and begin_step()")
        if self.mode in ("ddp", "fsdp"):
            raise ValueError(f"a monitor in {self.mode!r} mode cannot switch to {mode!r}; build a new NoiseMonitor")
        if mode != self.mode:
            self._mode.detach()
            self._mode = self._local_mode(mode)

    # ---- the loop's calls -----------------------------------------------------------------
    def _reset_step(self) -> None:
        self._ctx.reset()
        self._samples_local: Any = 0
        self._have_samples = True
        self._n_explicit = 0  # micro-batches given a loss_scale
        self._broken = False
        self._stale: Any = None  # |.grad|² before the step's first backward (measured steps)

    @property
    def measuring(self) -> bool:
        """Whether the step begun by ``begin_step`` is measured (one in ``every``)."""
        return self._in_step and self._measure

    def begin_step(self) -> None:
        """Start an optimizer step (clears what a previous unfinished step left)."""
        if self._closed:
            raise RuntimeError("NoiseMonitor is closed")
        self._reset_step()
        self._in_step = True
        self._measure = self._ctx.measuring = self._step_index % self.every == 0
        self._mode.detach()
        if self._measure:  # unmeasured steps carry no hooks at all
            self._mode.attach()

    def _detach(self) -> None:
        self._mode.detach()

    def micro_batch(self, count: Number | torch.Tensor, *, samples: Number | torch.Tensor | None = None,
                    loss_scale: Number | torch.Tensor | None = None) -> _MicroBatch:
        """Context for one micro-batch's backward.

        ``count``: loss units in this micro-batch (examples or tokens: what the loss sum is
        divided by). ``samples``: examples in it, when ``count`` is tokens (gives
        ``b_simple_samples``). ``loss_scale``: see the class docstring.
        """
        if not self._in_step:
            raise RuntimeError("call monitor.begin_step() before monitor.micro_batch()")
        if not isinstance(count, torch.Tensor):
            check_nonnegative("count", count)
        if samples is not None and not isinstance(samples, torch.Tensor):
            check_nonnegative("samples", samples)
        return _MicroBatch(self, count, samples, loss_scale)

    def _open_micro(self) -> None:
        ctx = self._ctx
        ctx.norms, ctx.norm_groups = [], []
        ctx.in_micro = True
        if ctx.measuring and self._stale is None:
            # Before the step's first backward .grad must be empty (or zeros): a gradient left from
            # an earlier step would be read as part of this one. Device work only, read at the flush.
            grads = self._mode.grads()
            self._stale = 0.0 if all(g is None for g in grads) else self._ctx.groups.sqnorms(grads).sum()

    def _close_micro(self, mb: _MicroBatch, ok: bool) -> None:
        ctx = self._ctx
        ctx.in_micro = False
        norms, ctx.norms = ctx.norms, []
        if not ctx.measuring:  # an unmeasured step keeps nothing
            return
        if not ok:
            self._broken = True  # a partial backward: this step's gradient is unknown
            return
        ctx.n_micro += 1
        ctx.count = ctx.count + mb.count
        if mb.loss_scale is None:  # one factor for all: the sums are the count (no device work)
            ctx.unit_sum = ctx.unit_sqsum = ctx.count
        else:
            self._n_explicit += 1
            a, q = unit_sums(mb.count, mb.loss_scale)
            ctx.unit_sum, ctx.unit_sqsum = ctx.unit_sum + a, ctx.unit_sqsum + q
        if mb.samples is None:
            self._have_samples = False
        else:
            self._samples_local = self._samples_local + mb.samples
        self._mode.micro_done(mb.count, mb.loss_scale, norms)

    def split_batch(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The pieces the loop should run as micro-batches for ``batch``: ``splits`` pieces in split
        mode on a measured step, else ``[batch]``. Call it before or after ``begin_step`` of the
        step it is for (the step counter only moves in ``end_step``)."""
        return self._mode.pieces(batch, self._step_index % self.every == 0)

    def end_step(self) -> NoiseReading:
        """Finish the step (call after the last backward, before ``optimizer.step()``).

        Under DDP every rank must call it (it holds a collective). The returned reading is
        lazy: its values are fetched from the device when first read.
        """
        if not self._in_step:
            raise RuntimeError("monitor.end_step() without monitor.begin_step()")
        self._in_step = False
        reading = NoiseReading(self, self._step_index)
        self._step_index += 1
        try:
            self._pending.append((reading, self._collect()))
        finally:
            self._ctx.measuring = False
        if len(self._pending) >= self.max_pending:
            self.flush()
        return reading

    def _collect(self) -> dict[str, Any] | None:
        """Device-side sums of the step, all-reduced across ranks; None if the step has no reading."""
        self._mode.detach()
        ctx = self._ctx
        if self._broken or ctx.n_micro == 0 or not self._measure:
            return None
        if 0 < self._n_explicit < ctx.n_micro:
            raise ValueError("loss_scale must be given to every micro_batch of a step or to none")
        explicit = self._n_explicit > 0
        self._mode.check_step()
        got = self._mode.readings()
        if got is None:
            return None
        big, readings = got
        dev = big.device
        # Each reading is Σ_j a_j·S_j over some micro-batches: raw/(Σ a n)² reads |G|² + tr Σ·(Σ a² n)/(Σ a n)².
        if readings:
            small_sum = sum(r.to(dev) / (a * a) for r, a, _ in readings)
            inv_n_sum, k = sum(q / (a * a) for _, a, q in readings), len(readings)
        else:  # still take part in the all-reduce: other ranks may have readings
            small_sum, inv_n_sum, k = torch.zeros_like(big), 0.0, 0
        # float64 gradients keep float64 sums; everything else is summed in float32.
        acc = torch.promote_types(small_sum.dtype, big.dtype) if isinstance(small_sum, torch.Tensor) else big.dtype
        # The big batch's two sums only matter with explicit loss scales (else they are the count).
        scal = [inv_n_sum, k, ctx.count, ctx.unit_sum if explicit else 0.0, ctx.unit_sqsum if explicit else 0.0,
                self._stale if self._stale is not None else 0.0]
        host: list[Any] | None = scal
        reduce_big = self._mode.reduce_big
        if self.world_size > 1 or any(isinstance(v, torch.Tensor) for v in scal):
            # Under FSDP the shards' squared norms ride along: Σ over ranks = |reduced gradient|².
            parts = [small_sum.to(acc), torch.stack([_scalar(v, dev) for v in scal]).to(acc)]
            vec = torch.cat(parts + [big.to(acc)] if reduce_big else parts)
            if self.world_size > 1:
                dist.all_reduce(vec, group=self.process_group)
            if reduce_big:
                vec, big = vec[: -big.numel()], vec[-big.numel():]
            small_sum, host = vec, None
        samples = self._samples_local if self._have_samples else None
        return {"dev": torch.cat([small_sum.to(acc), big.to(acc)]), "host": host, "explicit": explicit,
                "count_local": ctx.count, "samples_local": samples}

    # ---- host side ------------------------------------------------------------------------
    def flush(self) -> None:
        """Bring pending readings to the host and fold them into the estimators, in step order."""
        pending, self._pending = self._pending, []
        for reading, raw in pending:
            reading._set(self._flush_one(raw))

    def _flush_one(self, raw: dict[str, Any] | None) -> dict[str, Any]:
        n_groups = len(self.group_names)
        values: dict[str, Any] = {"valid": False, "b_small": math.nan, "b_big": math.nan,
                                  "grad_sqnorm_step": math.nan, "trace_sigma_step": math.nan}
        if raw is not None:
            got = step_inputs(raw["dev"].tolist(), raw["host"], raw["explicit"], n_groups, self.world_size)  # the host sync
            if got.stale > 0:
                self._warn_once("stale", f"NoiseMonitor: the parameters already held a gradient when the step's first "
                                f"backward began (|.grad|^2 = {got.stale:.4g}), so the step's gradient is not its own; "
                                "zero it (optimizer.zero_grad()) before the first micro-batch. No reading this step")
            elif got.small is None:
                if got.b_small >= got.units * (1 - 1e-9):
                    self._warn_once("single", "NoiseMonitor: a step with one micro-batch on one process has a single "
                                    "batch size and gives no estimate; use mode='split' or gradient accumulation")
                else:
                    self._warn_once("unequal_none", f"NoiseMonitor: the step's loss factors are so unequal that its "
                                    f"effective batch ({got.b_big:.4g} units) is not larger than its small batches "
                                    f"({got.b_small:.4g}): no estimate from such a step")
            else:
                if got.b_big < got.units * (1 - 1e-6):
                    self._warn_once("unequal", "NoiseMonitor: the micro-batches of a step had different loss factors "
                                    "per unit (a per-micro-batch mean loss over unequal counts, e.g. a padded LM "
                                    "without num_items_in_batch, or a short last micro-batch): training itself weights "
                                    f"their units unequally, an effective batch of {got.b_big:.4g} of {got.units:.4g} "
                                    "units. B_simple accounts for it; to weight every unit alike, divide the summed "
                                    "loss by the step's total count")
                small, big, b_small, b_big = got.small, got.big, got.b_small, got.b_big
                values.update(b_small=b_small, b_big=b_big)
                estimators = [self.estimator, *self.group_estimators.values()]
                inputs = [(sum(small), sum(big)), *zip(small, big)][: len(estimators)]
                if all(math.isfinite(a) and math.isfinite(b) for a, b in inputs):
                    values["valid"] = all([est.update(a, b, b_small, b_big) for est, (a, b) in zip(estimators, inputs)])
                else:  # one bad group makes the whole step unusable; counted, not folded in
                    for est in estimators:
                        est.n_skipped += 1
                if values["valid"]:
                    values.update(grad_sqnorm_step=self.estimator.last_grad_sqnorm,
                                  trace_sigma_step=self.estimator.last_trace_sigma)
            if raw["samples_local"] is not None:
                ratio = float(raw["count_local"]) / max(float(raw["samples_local"]), 1e-30)
                if math.isfinite(ratio) and ratio > 0:
                    self._ups_ema = self.beta * self._ups_ema + (1 - self.beta) * ratio
                    self._ups_pow *= self.beta
                    self._ups_n += 1
        values.update(self._snapshot())
        return values

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    @property
    def units_per_sample(self) -> float:
        """EMA of loss units per example (tokens per sequence); nan unless ``samples`` were given."""
        return self._ups_ema / (1 - self._ups_pow) if self._ups_n else math.nan

    def _snapshot(self) -> dict[str, Any]:
        est = self.estimator
        snap: dict[str, Any] = {"b_simple": est.b_simple, "grad_sqnorm": est.grad_sqnorm,
                                "trace_sigma": est.trace_sigma, "n_updates": est.n_updates,
                                "b_simple_samples": est.b_simple / self.units_per_sample if self._ups_n else None}
        snap["groups"] = {name: {"b_simple": e.b_simple, "grad_sqnorm": e.grad_sqnorm, "trace_sigma": e.trace_sigma}
                          for name, e in self.group_estimators.items()}
        return snap

    @property
    def b_simple(self) -> float:
        """Current ``B_simple`` in loss units (flushes pending readings)."""
        self.flush()
        return self.estimator.b_simple

    # ---- state and teardown ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {"version": 1, "mode": self.mode, "step": self._step_index, "groups": list(self.group_names),
                "estimator": self.estimator.state_dict(),
                "group_estimators": {k: e.state_dict() for k, e in self.group_estimators.items()},
                "units_per_sample": [self._ups_ema, self._ups_pow, self._ups_n]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("groups", [])) != list(self.group_names) or \
                set(state.get("group_estimators", {})) != set(self.group_estimators):
            raise ValueError(f"noise monitor state has groups {state.get('groups')}, this monitor has {self.group_names}")
        self.flush()
        self.estimator.load_state_dict(state["estimator"])
        for k, e in self.group_estimators.items():
            e.load_state_dict(state["group_estimators"][k])
        self._step_index = int(state["step"])
        ema, pw, n = state["units_per_sample"]
        self._ups_ema, self._ups_pow, self._ups_n = float(ema), float(pw), int(n)

    def close(self) -> None:
        """Remove the parameter hooks (a DDP comm hook cannot be removed; it becomes a pass-through)."""
        self._detach()
        self._closed = True
        self._in_step = self._ctx.in_micro = self._ctx.measuring = False

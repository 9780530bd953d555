"""A weight EMA whose decay is defined per sample.

θ̄ ← ρ_B θ̄ + (1 - ρ_B) θ with ρ_B = ρ^B for a step of B samples — the EMA scaling rule of
Busbridge et al. 2023, "How to Scale Your EMA", Definition 1.1 (ρ̂ = ρ^κ when the batch is
scaled by κ). Stating the decay per sample (or as a horizon in samples) makes the averaging
window independent of the batch size, as every time constant in bigbatch is (time is counted
in samples, not steps).

Core module: torch, numpy and the standard library only.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from bigbatch._checks import check_choice, check_in_range, check_int_positive, check_positive
from bigbatch.averaging._common import acc_dtype

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's weights, decay given per sample.

    After a step of ``batch_size`` = B samples, ``θ̄ ← ρ^B θ̄ + (1 − ρ^B) θ`` (Busbridge et al.
    2023, Def. 1.1 with κ = B): B steps at batch 1 and one step at batch B weigh the past
    identically, so changing the batch size does not change the averaging window in samples.
    Give exactly one of

    * ``horizon_samples`` H: the e-folding time in samples, ρ = exp(−1/H), so ρ^H = 1/e;
    * ``decay_per_sample`` ρ in (0, 1);
    * ``decay`` ρ_B together with ``batch_size`` B at which it was tuned (ρ = ρ_B^{1/B}), to
      carry a step-based recipe (e.g. 0.9999 at batch 256) to other batch sizes.

    Parameters are averaged in fp32 (or the parameter's dtype when wider). Floating-point
    buffers (BatchNorm running statistics) are copied from the model by default (``buffers=
    "copy"``: they are themselves running averages under the live weights) or averaged like
    parameters (``"average"``); integer buffers are always copied. A non-finite weight raises
    ``ValueError`` and leaves the average untouched, at the cost of one host sync per update;
    ``on_nonfinite="skip"`` instead leaves the EMA unchanged on the device for such a step,
    without any host sync, and counts it in ``skipped``.

    Under FSDP2 (``fully_shard``; parameters are DTensor shards) the average is kept as shards
    of the same layout and updated on the local shards only (no communication but one
    all-reduce of the finiteness flag, so that every rank skips or raises together).
    ``state_dict`` then gathers full tensors (a collective: call it on every rank) so that a
    checkpoint loads at any world size, with or without FSDP; ``load_state_dict`` takes full
    tensors and keeps each rank's shard.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        horizon_samples: float | None = None,
        decay_per_sample: float | None = None,
        decay: float | None = None,
        batch_size: int | None = None,
        buffers: str = "copy",
        on_nonfinite: str = "raise",
        dtype: torch.dtype | None = None,
    ) -> None:
        given = [x is not None for x in (horizon_samples, decay_per_sample, decay)]
        if sum(given) != 1:
            raise ValueError("give exactly one of horizon_samples, decay_per_sample, or decay with batch_size")
        if horizon_samples is not None:
            self.log_decay = -1.0 / check_positive("horizon_samples", horizon_samples)
        elif decay_per_sample is not None:
            self.log_decay = math.log(check_in_range("decay_per_sample", decay_per_sample, 0.0, 1.0, lo_inclusive=False))
        else:
            if batch_size is None:
                raise ValueError("decay needs the batch_size it was tuned at (decay is per step of that batch)")
            rho = check_in_range("decay", decay, 0.0, 1.0, lo_inclusive=False)
            self.log_decay = math.log(rho) / check_int_positive("batch_size", batch_size)
        if batch_size is not None and decay is None:
            raise ValueError("batch_size is only used with decay (per-step decay at that batch size)")
        self.buffers = check_choice("buffers mode", buffers, ["copy", "average"])
        self.on_nonfinite = check_choice("on_nonfinite mode", on_nonfinite, ["raise", "skip"])
        self.samples = 0
        self.updates = 0
        self._skipped: int | torch.Tensor = 0
        self.shadow: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._meshes: list[Any] = []
        _reshard(model)
        for name, t in self._tracked(model):
            want = dtype or (acc_dtype(t.dtype) if t.is_floating_point() else t.dtype)
            self.shadow[name] = t.detach().to(want if t.is_floating_point() else t.dtype, copy=True)
        self._meshes = _meshes(self.shadow.values())

    # -- the math: one function, plain to read -------------------------------------------

    @property
    def decay_per_sample(self) -> float:
        """ρ, the decay applied per training sample."""
        return math.exp(self.log_decay)

    @property
    def horizon_samples(self) -> float:
        """H = −1/ln ρ: after H samples the old average's weight has fallen to 1/e."""
        return -1.0 / self.log_decay

    def decay_at(self, batch_size: int) -> float:
        """ρ^B, the per-step decay at batch size B (Busbridge et al. 2023, Def. 1.1)."""
        return math.exp(self.log_decay * check_int_positive("batch_size", batch_size))

    # -- updating ---------------------------------------------------------------------

    def _tracked(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        if self._meshes:
            _reshard(model)
        yield from model.named_parameters()
        yield from model.named_buffers()

    def _pairs(self, model: nn.Module) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Names and (ema, model) tensors to average, and (ema, model) tensors to copy."""
        live = dict(self._tracked(model))
        if live.keys() != self.shadow.keys():
            missing = [n for n in self.shadow if n not in live] or [n for n in live if n not in self.shadow]
            raise ValueError(
                f"model does not match the EMA: {missing[0]!r} is in one but not the other "
                "(pass the unwrapped model: model.module for DDP, model._orig_mod for torch.compile)"
            )
        params = {n for n, _ in model.named_parameters()}
        names: list[str] = []
        avg_e, avg_m, cp_e, cp_m = [], [], [], []
        for name, e in self.shadow.items():
            t = live[name].detach()
            if t.shape != e.shape:
                raise ValueError(f"model tensor {name!r} has shape {tuple(t.shape)}, the EMA's has {tuple(e.shape)}")
            if _is_dtensor(t) != _is_dtensor(e) or (_is_dtensor(t) and t.placements != e.placements):
                raise ValueError(f"model tensor {name!r} is sharded differently from the EMA's (build the EMA after fully_shard)")
            e, t = _local(e), _local(t)  # DTensor shards: the update is elementwise, each rank does its own
            if t.is_floating_point() and (name in params or self.buffers == "average"):
                names.append(name)
                avg_e.append(e)
                avg_m.append(t)
            else:
                cp_e.append(e)
                cp_m.append(t)
        return names, avg_e, avg_m, cp_e, cp_m

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int) -> None:
        """Fold in the model's current weights after a step of ``batch_size`` samples."""
        w = 1.0 - self.decay_at(batch_size)
        names, avg_e, avg_m, cp_e, cp_m = self._pairs(model)
        checked = avg_m + [m for m in cp_m if m.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in checked]).all() if checked else None
        if self._meshes:  # one rank's shard decides for all: every rank skips (or raises) together
            finite = _all_ranks(finite if finite is not None else torch.ones((), dtype=torch.bool), self._meshes)
        src = [m if m.dtype == e.dtype else m.to(e.dtype) for e, m in zip(avg_e, avg_m)]
        if finite is not None and self.on_nonfinite == "raise":
            if not bool(finite):  # the one host sync per update
                bad = next((n for n, t in zip(names + [""] * len(cp_m), checked) if not bool(torch.isfinite(t).all())), None)
                where = "another rank's shard" if bad is None else repr(bad or "a buffer")
                raise ValueError(f"model weights are not finite ({where} has NaN or inf); the EMA was left unchanged")
        elif finite is not None:
            # no host sync: a non-finite step leaves every EMA tensor as it was
            src = [torch.where(finite, m, e) for e, m in zip(avg_e, src)]
            cp_m = [torch.where(finite, m, e) for e, m in zip(cp_e, cp_m)]
            self._skipped = self._skipped + (~finite).long()
        if avg_e:
            # θ̄ + w (θ − θ̄) = ρ^B θ̄ + (1 − ρ^B) θ
            torch._foreach_lerp_(avg_e, src, w)
        for e, m in zip(cp_e, cp_m):
            e.copy_(m)
        self.samples += int(batch_size)
        self.updates += 1

    @property
    def skipped(self) -> int:
        """Updates skipped for non-finite weights (``on_nonfinite="skip"``); reading it syncs."""
        return int(self._skipped)

    # -- using the average ------------------------------------------------------------

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA's."""
        live = dict(self._tracked(model))
        self._pairs(model)  # same names and shapes, or a clear error
        for name, e in self.shadow.items():
            _local(live[name]).copy_(_local(e))

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model carries the EMA weights; the live ones come back after.

        ``with ema.applied(model): metric = evaluate(model)`` — costs one copy of the weights.
        """
        backup = [_local(t).detach().clone() for _, t in self._tracked(model)]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, t), b in zip(self._tracked(model), backup):
                    _local(t).copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state; DTensor shards are gathered into full CPU tensors (every rank must call)."""
        return {
            "log_decay": self.log_decay,
            "buffers": self.buffers,
            "on_nonfinite": self.on_nonfinite,
            "samples": self.samples,
            "updates": self.updates,
            "skipped": self.skipped,
            "shadow": OrderedDict((k, v.full_tensor().cpu() if _is_dtensor(v) else v.clone()) for k, v in self.shadow.items()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``: same tensor names and shapes; full tensors are re-sharded under FSDP2."""
        shadow = state["shadow"]
        if list(shadow) != list(self.shadow):
            diff = [n for n in self.shadow if n not in shadow] or [n for n in shadow if n not in self.shadow]
            raise ValueError(f"EMA state does not match this model: {diff[0] if diff else 'key order'!r} differs")
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(self.shadow[name].shape)}")
        self.log_decay = float(state["log_decay"])
        self.buffers = check_choice("buffers mode", state["buffers"], ["copy", "average"])
        self.on_nonfinite = state.get("on_nonfinite", self.on_nonfinite)
        self.samples, self.updates, self._skipped = int(state["samples"]), int(state["updates"]), int(state.get("skipped", 0))
        for name, t in shadow.items():
            e = self.shadow[name]
            if _is_dtensor(e) and not _is_dtensor(t):  # a full tensor: keep this rank's shard of it
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(e.device), e.device_mesh, e.placements, src_data_rank=None)
            _local(e).copy_(_local(t))


# ---- DTensor (FSDP2) helpers -------------------------------------------------------------


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _meshes(tensors: Iterable[torch.Tensor]) -> list[Any]:
    found: list[Any] = []
    for t in tensors:
        if _is_dtensor(t) and all(t.device_mesh is not m for m in found):
            found.append(t.device_mesh)
    return found


def _all_ranks(flag: torch.Tensor, meshes: list[Any]) -> torch.Tensor:
    """``flag`` AND-ed over every rank of every mesh (a MIN all-reduce per mesh dimension)."""
    import torch.distributed as dist

    v = flag.to(torch.float32).reshape(1)
    for mesh in meshes:
        for group in mesh.get_all_groups():
            dist.all_reduce(v, op=dist.ReduceOp.MIN, group=group)
    return v[0] > 0


def _reshard(model: nn.Module) -> None:
    """Register the sharded parameters on every FSDP2 unit (``FSDPModule.reshard``, not recursive).

    A forward leaves a unit unsharded when its ``reshard_after_forward`` is False (the root's
    default): its modules then hold plain full tensors, and the unsharded copy would outlive an
    in-place change of the shards (the next forward would skip the all-gather and use stale weights).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()

"""Glue shared by LARS, LAMB and MERIT: state, dtype handling, NaN guard, path dispatch.

The classes only validate, hold state and pick a path; the math lives in plain functions
beside each class (``lamb.py``: ``lamb_single`` / ``lamb_foreach``), the fused CUDA kernels in
``bigbatch.optim._fused`` (imported only when a fused step runs, so CPU installs never import
Triton). Each class declares how its kernels run in a :class:`FusedSpec` (``fused_spec``): the
fused path reads that record, never the algorithm's name.

Dtypes: parameters may be float64, float32, bfloat16 or float16 (fused: not float64). Moments
of low-precision parameters are kept in float32 and their arithmetic runs in float32; a
low-precision parameter receives the rounded result. With
``master_weights=True`` a float32 copy of each low-precision parameter is kept in the state and
updated instead, so small updates are not lost to bf16 rounding (mixed-precision training,
Micikevicius et al. 2018).

Non-finite gradients (``nonfinite=``): ``"raise"`` (default) raises ``FloatingPointError``
before any state changes; ``"skip"`` skips the whole step on every parameter, leaves the state
untouched and counts it in ``optimizer.skipped_steps`` (no host synchronisation on the fused
path, so it is CUDA-graph capturable). NaN/inf never reaches the moments or the weights.
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from bigbatch._checks import check_choice, check_nonnegative, check_positive
from bigbatch.optim._common import all_finite, is_dtensor, local

__all__ = ["FUSED_LAYOUTS", "FusedCache", "FusedSpec", "TrustRatioOptimizer", "fused_available", "fused_refusal"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_LOW = (torch.bfloat16, torch.float16)


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW else p.dtype


def _interpreting() -> bool:
    # Triton's interpreter runs the kernels on CPU tensors (how they are tested without a GPU).
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_refusal(params: Iterable[Tensor]) -> str | None:
    """Why the fused path cannot take ``params`` (None: it can).

    It takes float32/bf16/fp16 CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``), plain or
    DTensors (FSDP2) whose placements are ``Shard(0)`` on at most one mesh dim and ``Replicate``
    on the others, and needs Triton.
    """
    ps = list(params)
    if not ps:
        return "no parameters"
    for p in ps:
        lp = local(p)
        if not (lp.is_cuda or (lp.device.type == "cpu" and _interpreting())):
            return f"parameters must be CUDA tensors, got one on {lp.device}"
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"parameters must be float32, bfloat16 or float16, got {p.dtype}"
        if is_dtensor(p):
            from torch.distributed.tensor import Replicate, Shard

            shards = [pl for pl in p.placements if isinstance(pl, Shard)]
            if len(shards) > 1 or any(s.dim != 0 for s in shards) or not all(
                    isinstance(pl, (Shard, Replicate)) for pl in p.placements):
                return (f"DTensor placements {tuple(p.placements)} are not supported (only Shard(0) on one mesh "
                        "dim, Replicate on the others)")
    try:
        import triton  # noqa: F401
    except Exception:
        return "Triton is not installed"
    return None


def fused_available(params: Iterable[Tensor]) -> bool:
    """True when :func:`fused_refusal` has no objection to ``params``."""
    return fused_refusal(params) is None


FUSED_LAYOUTS: dict[str, str] = {"chunks": "sum", "tiles": "max"}
"""The fused path's table layouts → the reduction each one carries between the two passes.

``"chunks"``: every tensor cut into 1-D chunks of ``kernels.BLOCK`` elements (tables ``ch_tid``,
``ch_start``); pass 1 adds two float32 sums per tensor into ``acc`` (``[2 * n]``, e.g. Σw², Σu²),
all-reduced with SUM over the shard group. ``"tiles"``: every tensor seen as rows × columns in
``TILE_M × TILE_N`` tiles (tables ``meta``, ``t_tid``/``t_r``/``t_i``/``t_j``, ``items``); pass 1
stores partial row / column maxima that the reduce kernel folds into ``maxbuf`` (int32 float
bits: row, column and whole-tensor maxima of two quantities), all-reduced with MAX."""


@dataclass(frozen=True, slots=True)
class FusedSpec:
    """How an optimizer's fused (Triton) kernels run: the one record ``bigbatch.optim._fused`` reads.

    The pack (flat state buffers, pointer tables, the non-finite flag, the two passes, FSDP2's
    all-reduce between them) is the same for every optimizer; the spec names what differs.
    """

    tables: str
    """The table layout the kernels index: a key of :data:`FUSED_LAYOUTS` (``"chunks"``, ``"tiles"``)."""
    reduction: str
    """What pass 1 leaves for pass 2 and the shard group all-reduces: ``"sum"`` or ``"max"`` (the
    one that ``tables`` carries, :data:`FUSED_LAYOUTS`)."""
    launch: str
    """``"module:function"``, imported on the first fused step and called as
    ``launch(pack, group, pass_, flag, gscale)`` for pass 1 and pass 2 of one pack (the pack's
    public fields: ``bigbatch.optim._fused``)."""

    def __post_init__(self) -> None:
        check_choice("FusedSpec.tables", self.tables, FUSED_LAYOUTS)
        if self.reduction != FUSED_LAYOUTS[self.tables]:
            raise ValueError(f"FusedSpec.reduction must be {FUSED_LAYOUTS[self.tables]!r} with tables={self.tables!r} "
                             f"(layouts and their reductions: {FUSED_LAYOUTS}), got {self.reduction!r}")
        mod, _, fn = self.launch.partition(":")
        if not mod or not fn:
            raise ValueError(f"FusedSpec.launch must be 'module:function', got {self.launch!r}")


@dataclass(slots=True)
class FusedCache:
    """The fused path's bookkeeping for one optimizer, handed to ``bigbatch.optim._fused``.

    Kept here (not in ``_fused``, which imports Triton) so that the optimizer owns it and the
    fused module reads only public names: ``fused_spec``, ``state_keys``, ``init_state``,
    ``grad_prenorm``, ``nonfinite`` and this record.
    """

    packs: dict[Any, Any] = field(default_factory=dict)
    """Flat-buffer packs and the step plan; cleared whenever the state is swapped."""
    flag: Tensor | None = None
    """Device int32[1]: nonzero when this step saw a non-finite gradient."""
    skipped: Tensor | None = None
    """Device float32 counter of skipped steps (no host sync)."""


class TrustRatioOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``state_keys`` and ``fused_spec`` and define ``_update`` (reference math)."""

    state_keys: tuple[str, ...] = ()
    """Names of the per-parameter state tensors shaped like the parameter (moments, buffers)."""
    fused_spec: FusedSpec | None = None
    """How its fused kernels run (:class:`FusedSpec`); None: it has no fused path (``fused=True`` is refused)."""
    grad_prenorm: float | None = None
    """Global gradient-norm bound applied before the update (LAMB's option), or None."""

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        foreach: bool | None,
        fused: bool | None,
        master_weights: bool,
        nonfinite: str,
    ) -> None:
        check_positive("lr", defaults["lr"])
        check_nonnegative("weight_decay", defaults["weight_decay"])
        check_choice("nonfinite", nonfinite, ("raise", "skip"))
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True; pick one")
        defaults = {**defaults, "foreach": foreach, "fused": fused, "master_weights": bool(master_weights)}
        super().__init__(params, defaults)
        self.nonfinite = nonfinite
        self._skipped_host = 0
        self._fused = FusedCache()
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"params must be float64, float32, bfloat16 or float16, got {p.dtype}")
                if p.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse parameters")
            why = fused_refusal(group["params"]) if self.fused_spec is not None else (
                f"{type(self).__name__} declares no fused kernels (fused_spec is None)")
            if group["fused"] and why is not None:
                raise ValueError(f"fused=True needs parameters the fused kernels take: {why}; use foreach=True otherwise")
            if group["fused"] is None:
                group["fused"] = why is None and not group["foreach"]
                if why is not None and not group["foreach"] and any(is_dtensor(p) for p in group["params"]):
                    warnings.warn(f"{type(self).__name__}: fused path not used ({why}); using foreach", stacklevel=3)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of a non-finite gradient (``nonfinite="skip"``); reading it syncs."""
        dev = 0 if self._fused.skipped is None else int(self._fused.skipped.item())
        return self._skipped_host + dev

    # ---- state ---------------------------------------------------------------------------
    def init_state(self, p: Tensor, group: dict) -> dict:
        """``p``'s state entry, created on first use (step counter, ``state_keys`` tensors, master copy)."""
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            for k in self.state_keys:
                st[k] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            if group["master_weights"] and p.dtype in _LOW:
                st["master"] = p.detach().float().clone()
        return st

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The execution path is a property of this optimizer, not of the checkpoint: a state saved
        # by the fused path loads into a foreach one (and across devices) and vice versa.
        paths = [(g["foreach"], g["fused"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, (fe, fu) in zip(self.param_groups, paths):
            g["foreach"], g["fused"] = fe, fu
        # torch casts floating state to the parameter's dtype; our moments and master copy are
        # float32 by design, so re-read them from the saved values at full precision.
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            for k, v in saved.items():
                if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                    self.state[p][k] = v.detach().to(device=p.device, dtype=_state_dtype(p), copy=True)
        self._fused.packs.clear()  # fused flat buffers must be rebuilt from the loaded state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # Fused state entries are views into flat buffers; save compact standalone copies so a
        # checkpoint does not carry (or alias) the whole buffer.
        sd["state"] = {
            i: {k: (v.clone() if torch.is_tensor(v) and local(v)._base is not None else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        return sd

    # ---- step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused_groups, ref_groups = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            (fused_groups if group["fused"] else ref_groups).append((group, params))
        if fused_groups:
            from bigbatch.optim._fused import fused_step

            ref_grads = [p.grad for _, ps in ref_groups for p in ps]
            flag = fused_step(self, self._fused, fused_groups, run_reference=bool(ref_groups), ref_grads=ref_grads)
            if ref_groups:
                self._reference_step(ref_groups, skip=flag)
            return loss
        self._reference_step(ref_groups, skip=None)
        return loss

    def _reference_step(self, groups: list, skip: Tensor | None) -> None:
        grads = [p.grad for _, ps in groups for p in ps]
        if skip is None:
            finite = bool(all_finite(grads)) if grads else True
        else:
            finite = not bool(skip)
        if not finite:
            if skip is not None:  # the fused part already counted (or raised) this step
                return
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite (nan/inf) gradient; the step was not applied and "
                    "the optimizer state is unchanged (pass nonfinite='skip' to skip such steps)"
                )
            self._skipped_host += 1
            return
        if self._fused.packs:  # state tensors may change identity below: fused packs must re-read them
            self._fused.packs.clear()
        prenorm = self._grad_scale(grads)
        for group, params in groups:
            states = [self.init_state(p, group) for p in params]
            for st in states:
                if st["step"].device.type != "cpu":  # e.g. after a fused step; keep host scalars here
                    st["step"] = st["step"].detach().cpu()
                st["step"] += 1
            # FSDP2 shards (DTensors): the math runs on the rank-local shards; only the per-tensor
            # reductions look at ``shards`` to all-reduce over the shard group.
            shards = [p if is_dtensor(p) else None for p in params]
            shards = shards if any(s is not None for s in shards) else None
            lstates = [{k: local(v) if torch.is_tensor(v) else v for k, v in st.items()} for st in states]
            low = [p.dtype in _LOW for p in params]
            ws = [st.get("master", local(p)) if lo else local(p) for p, st, lo in zip(params, lstates, low)]
            ws = [w.float() if w.dtype in _LOW else w for w in ws]  # float32 work copies
            gs = [local(p.grad) for p in params]
            gs = [g.to(w.dtype) if g.dtype != w.dtype else g for g, w in zip(gs, ws)]
            if prenorm is not None:
                gs = torch._foreach_mul(gs, prenorm)  # new tensors: .grad itself is never touched
            self._update(group, ws, gs, lstates, shards)
            for p, w, st, lo in zip(params, ws, lstates, low):
                if "master" in st and w is not st["master"]:
                    st["master"].copy_(w)
                if lo:
                    local(p).copy_(w)

    def _grad_scale(self, grads: list[Tensor]) -> Tensor | None:
        """Global gradient-norm pre-normalisation factor (LAMB's ``grad_prenorm``), else None."""
        return None

    def _update(self, group: dict, ws: list[Tensor], gs: list[Tensor], states: list[dict], shards: list | None) -> None:
        raise NotImplementedError

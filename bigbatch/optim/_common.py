"""Ingredients LARS, LAMB and MERIT share, written once (optax's ``scale_by_trust_ratio`` habit).

* :func:`trust_ratio` — the zero-norm rule: a ratio is 1 when either of its norms is 0.
  A zero weight tensor (a freshly zero-initialised layer) or a zero update would otherwise give
  a ratio of 0 or inf and freeze or blow up the layer (You et al. 2017 §3; You et al. 2019 Alg. 2).
* :func:`tensor_norms`, :func:`tensor_max_abs` — per-tensor l2 norms and max-norms over a list of
  tensors. DTensor-aware: under FSDP2 each rank holds a shard, so the local sum of squares is
  all-reduced (SUM) and the local max all-reduced (MAX) over the shard's process group before the
  ratio is taken; the result is a plain tensor that equals the unsharded one.
* :func:`merit_update_` — MERIT's clipped update with its element-wise max-norm trust ratio, for one tensor.
* :func:`local` / :func:`all_finite` — plumbing for the sharded and NaN-guarded paths.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["trust_ratio", "tensor_norms", "tensor_max_abs", "merit_update_", "local", "all_finite", "is_dtensor"]


_DTENSOR: tuple = ()
_DTENSOR_LOOKED_UP = False


def is_dtensor(t: Tensor) -> bool:
    # Imported lazily (torch.distributed may be absent from minimal builds) and only once: this
    # runs per parameter on every fused step.
    global _DTENSOR, _DTENSOR_LOOKED_UP
    if not _DTENSOR_LOOKED_UP:
        try:
            from torch.distributed.tensor import DTensor

            _DTENSOR = (DTensor,)
        except Exception:  # pragma: no cover - torch without distributed
            _DTENSOR = ()
        _DTENSOR_LOOKED_UP = True
    return isinstance(t, _DTENSOR)


def local(t: Tensor) -> Tensor:
    """The rank-local shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _shard_groups(t: Tensor) -> list:
    """Process groups over which ``t``'s values are split (mesh dims with a Shard placement)."""
    if not is_dtensor(t):
        return []
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    return [mesh.get_group(i) for i, pl in enumerate(t.placements) if isinstance(pl, Shard)]


def _all_reduce(values: Tensor, tensors: Sequence[Tensor], op: str) -> Tensor:
    """All-reduce entry i of ``values`` over the shard groups of ``tensors[i]`` (batched per group)."""
    if not any(is_dtensor(t) for t in tensors):
        return values
    import torch.distributed as dist

    rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    by_group: dict[int, tuple[object, list[int]]] = {}
    for i, t in enumerate(tensors):
        for g in _shard_groups(t):
            by_group.setdefault(id(g), (g, []))[1].append(i)
    values = values.clone()
    for g, idx in by_group.values():
        sel = torch.tensor(idx, device=values.device)
        part = values.index_select(0, sel)
        dist.all_reduce(part, op=rop, group=g)
        values.index_copy_(0, sel, part)
    return values


def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    # float64 inputs keep float64 norms (the test references); everything else reduces in float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tensor_norms(tensors: Sequence[Tensor], like: Sequence | None = None) -> Tensor:
    """Per-tensor l2 norms as one 1-D tensor (float32, float64 for float64 inputs).

    ``like[i]``, when given, is the DTensor that ``tensors[i]`` is the local shard of (or None):
    its placements say over which process groups the sums of squares are all-reduced.
    """
    if not tensors:
        return torch.zeros(0)
    locs = [local(t) for t in tensors]
    # Sum of squares (not the norm) is what adds across shards.
    dt = _acc_dtype(locs)
    sq = torch.stack([n.to(dt) for n in torch._foreach_norm(locs)]).square()
    return _all_reduce(sq, tensors if like is None else like, "sum").sqrt()


def tensor_max_abs(tensors: Sequence[Tensor], like: Sequence | None = None) -> Tensor:
    """Per-tensor max-norms ``max |x|`` (0 for an empty shard); ``like`` as in :func:`tensor_norms`."""
    if not tensors:
        return torch.zeros(0)
    locs = [local(t) for t in tensors]
    dt = _acc_dtype(locs)
    mx = torch.stack([n.to(dt) for n in torch._foreach_norm(locs, ord=float("inf"))])
    return _all_reduce(mx, tensors if like is None else like, "max")


def trust_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 1 where ``num`` or ``den`` is 0 (the zero-norm rule)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


def _amax_dim(ax: Tensor, dim: int, full: Tensor) -> Tensor:
    """``ax.amax(dim, keepdim=True)`` of a non-negative ``ax``, all-reduced (MAX) over shards when ``dim`` is sharded."""
    loc = local(ax)
    if loc.numel() == 0:
        shape = list(loc.shape)
        shape[dim] = 1
        out = loc.new_zeros(shape)
    else:
        out = loc.amax(dim=dim, keepdim=True)
    if is_dtensor(full):
        from torch.distributed.tensor import Shard
        import torch.distributed as dist

        mesh = full.device_mesh
        for i, pl in enumerate(full.placements):
            if isinstance(pl, Shard) and pl.dim == dim:
                dist.all_reduce(out, op=dist.ReduceOp.MAX, group=mesh.get_group(i))
    return out


def merit_update_(w: Tensor, u: Tensor, w_full: Tensor | None = None) -> Tensor:
    """MERIT's step direction ``clip(u ⊙ t, −1, 1)`` for one tensor, written into ``u`` (Luo et al. 2025, Alg. 1).

    For ``w.dim() >= 2``: ``R = max|w| over dim 1 / max|u| over dim 1`` (row ratio),
    ``C`` likewise over dim 0 (column ratio), ``ρ = max|w| / max|u|`` over the whole tensor;
    ``t = max(max(R, C), ρ)``, and ``t = 1`` wherever one of the four row/column maxima is 0.
    For a vector: ``t = ρ`` (1 if either max is 0). ``w`` and ``u`` are plain (rank-local)
    tensors; ``w_full`` is the DTensor ``w`` is a shard of (its placements say which maxima must
    be all-reduced), ``None`` otherwise.

    No ratio is ever formed. A row whose gradient has been 0 for long (a dead ReLU unit) keeps a
    momentum that decays into float32's subnormal range; ``max|w_row| / max|u_row|`` then exceeds
    float32's largest value and overflows to inf, ``0 · inf`` is NaN where ``u`` is 0, and the clip
    keeps the NaN. Instead each ratio stays a (numerator, denominator) pair — ``max(R, ρ)`` is
    picked per row by comparing cross products in float64 — and the product is formed as
    ``(|u| / den) · num``: a number in [0, 1] times ``max|w|``, which cannot overflow.
    """
    full = w if w_full is None else w_full
    a = u.abs()
    if w.dim() >= 2:
        aw = w.abs()
        rw, ru = _amax_dim(aw, 1, full), _amax_dim(a, 1, full)
        cw, cu = _amax_dim(aw, 0, full), _amax_dim(a, 0, full)
        pn, pd = _zero_rule(*_all_reduce(torch.stack([_max0(rw), _max0(ru)]), [full, full], "max"))
        rn, rd = _max_ratio(rw, ru, pn, pd)
        cn, cd = _max_ratio(cw, cu, pn, pd)
        s = torch.maximum(a.div(rd).mul_(rn), a.div(cd).mul_(cn))
        s = torch.where((rw == 0) | (ru == 0) | (cw == 0) | (cu == 0), a, s)
    else:
        mw = _all_reduce(_max0(w.abs()).reshape(1), [full], "max")[0]
        mu = _all_reduce(_max0(a).reshape(1), [full], "max")[0]
        pn, pd = _zero_rule(mw, mu)
        s = a.div(pd).mul_(pn)
    return torch.copysign(s.clamp_(max=1.0), u, out=u)


def _zero_rule(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """The pair (num, den), or (1, 1) when either is 0 (:func:`trust_ratio`'s rule, kept as a pair)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num, 1), torch.where(ok, den, 1)


def _max_ratio(num: Tensor, den: Tensor, pn: Tensor, pd: Tensor) -> tuple[Tensor, Tensor]:
    """``max(num / den, pn / pd)`` element-wise as a (numerator, denominator) pair, without dividing.

    ``num / den ≥ pn / pd`` ⟺ ``num · pd ≥ pn · den`` (all ≥ 0), compared in float64 so that
    neither product under- or overflows; where ``den`` is 0 the pair is (pn, pd) (nonzero).
    """
    take = (den > 0) & (num.double() * pd.double() >= pn.double() * den.double())
    return torch.where(take, num, pn), torch.where(take, den, pd)


def _max0(x: Tensor) -> Tensor:
    """``x.amax()`` of a non-negative tensor, 0 when it is empty (an empty FSDP shard)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.amax().to(dt) if x.numel() else x.new_zeros((), dtype=dt)


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (one fused reduction per device)."""
    if not tensors:
        return torch.tensor(True)
    # A non-finite element makes the tensor's max-norm inf or nan; one foreach call covers all.
    mx = torch.stack([m.float() for m in torch._foreach_norm([local(t) for t in tensors], ord=float("inf"))])
    # NaN does not survive a MAX all-reduce reliably, so reduce a 0/1 "bad" flag instead.
    bad = _all_reduce((~torch.isfinite(mx)).float(), tensors, "max")
    return (bad == 0).all()

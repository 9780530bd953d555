"""MERIT (Luo et al. 2025, "MERIT: Maximum-normalized Element-wise Ratio for Language Model
Large-batch Training", ICML 2025; official code NUS-HPC-AI-Lab/MERIT, ``optim/merit.py``).

Implemented equations (the paper's Algorithm 1, as its official code computes them)::

    m ← β1 m + (1−β1) g          v ← β2 v + (1−β2) g²        (no bias correction)
    u = m / (√v + ε) + λ w
    tensor with ≥ 2 dims (rows = dim 0, columns = dim 1, other dims kept):
        R_ij = max_k |w_ik| / max_k |u_ik|        (max over dim 1: row-wise max-norm ratio)
        C_ij = max_k |w_kj| / max_k |u_kj|        (max over dim 0: column-wise)
        ρ    = max |w| / max |u|                  (whole tensor)
        t_ij = max(max(R_ij, C_ij), ρ);  t_ij = 1 where any of the four row/col maxima is 0
    vector:  t = max|w| / max|u|  (1 if either is 0)
    s = clip(u ⊙ t, −1, 1)  element-wise;   w ← w − lr · s

``t`` itself is never formed (``bigbatch.optim._common.merit_update_``): on a dead unit's row the
momentum decays to float32 subnormals and ``max|w| / max|u|`` overflows to inf, which made
``0 · inf = NaN`` in the weights; ``s`` is built from ``(|u| / max|u|) · max|w|`` instead.

The max-norm (instead of LAMB's l2 norm) bounds the largest update entry, which is what limits
the growth of the maximum attention logit (§3.1); the element-wise ratio follows local weight
structure (§3.2). ``adapt=False`` forces t = 1 (the clip stays: Adam without bias correction,
each step entry bounded by lr).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from bigbatch._checks import check_in_range, check_positive
from bigbatch.optim._base import FusedSpec, TrustRatioOptimizer
from bigbatch.optim._common import merit_update_

__all__ = ["MERIT", "merit_single", "merit_foreach"]


def _apply_ratio(w: Tensor, u: Tensor, lr: float, adapt: bool, shard=None) -> None:
    s = merit_update_(w, u, shard) if adapt else u.clamp_(-1.0, 1.0)
    w.add_(s, alpha=-lr)


def merit_single(ws, gs, ms, vs, *, lr, beta1, beta2, eps, weight_decay, adapt, shards=None):
    """Plain per-tensor loop (float32 ``ws`` updated in place; ``gs`` only read)."""
    for k, (w, g, m, v) in enumerate(zip(ws, gs, ms, vs)):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = m / (v.sqrt() + eps)
        if weight_decay:
            u.add_(w, alpha=weight_decay)
        _apply_ratio(w, u, lr, adapt, None if shards is None else shards[k])


def merit_foreach(ws, gs, ms, vs, *, lr, beta1, beta2, eps, weight_decay, adapt, shards=None):
    """Moments and ``u`` with ``torch._foreach_*``; the row/column maxima per tensor
    (``amax`` over one dim has no foreach form)."""
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, gs, alpha=1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps)
    us = torch._foreach_div(ms, denom)
    if weight_decay:
        torch._foreach_add_(us, ws, alpha=weight_decay)
    if adapt:  # clip(u ⊙ t) in place, per tensor (see merit_update_ for why t is never formed)
        sh = shards if shards is not None else [None] * len(ws)
        for w, u, s in zip(ws, us, sh):
            merit_update_(w, u, s)
    else:
        torch._foreach_clamp_min_(us, -1.0)
        torch._foreach_clamp_max_(us, 1.0)
    torch._foreach_add_(ws, us, alpha=-lr)


class MERIT(TrustRatioOptimizer):
    """MERIT as a ``torch.optim.Optimizer`` (equations in the module docstring).

    Args:
        lr: > 0. betas: (β1, β2) in [0, 1). eps: ε > 0 (default 1e-6). weight_decay: λ ≥ 0 (default 0).
        adapt: per-group; False forces t = 1. foreach / fused / master_weights / nonfinite: as for
        :class:`bigbatch.optim.LAMB`.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    fused_spec = FusedSpec(tables="tiles", reduction="max", launch="bigbatch.optim._fused.kernels:launch_merit")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        adapt: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        master_weights: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        b1 = check_in_range("betas[0]", betas[0], 0.0, 1.0)
        b2 = check_in_range("betas[1]", betas[1], 0.0, 1.0)
        check_positive("eps", eps)  # ε = 0 would give 0/0 where a gradient entry was always 0
        defaults = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, adapt=bool(adapt))
        super().__init__(params, defaults, foreach=foreach, fused=fused, master_weights=master_weights, nonfinite=nonfinite)

    def _update(self, group: dict[str, Any], ws: list[Tensor], gs: list[Tensor], states: list[dict], shards=None) -> None:
        fn = merit_single if group["foreach"] is False else merit_foreach
        fn(
            ws, gs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            lr=float(group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            weight_decay=group["weight_decay"], adapt=group["adapt"], shards=shards,
        )

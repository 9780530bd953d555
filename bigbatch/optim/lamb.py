"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2), with NVIDIA's optional global gradient pre-normalisation.

Per tensor ``w`` with gradient ``g`` at step ``t`` (Alg. 2, lines 5-9)::

    m ← β1 m + (1−β1) g              v ← β2 v + (1−β2) g²
    m̂ = m / (1−β1^t)                 v̂ = v / (1−β2^t)         (bias correction, switchable)
    u = m̂ / (√v̂ + ε) + λ w
    ratio = φ(‖w‖) / ‖u‖              (1 if ‖w‖ or ‖u‖ is 0; φ = id or clamp to [γ_l, γ_u])
    w ← w − lr · ratio · u

``adapt=False`` forces ratio = 1: ``w ← w − lr·m̂/(√v̂+ε) − lr·λw``, which is exactly
``torch.optim.AdamW`` (decoupled decay, the lr in the decay term; equal to rounding, tested).
``grad_prenorm=c`` first scales every gradient by ``c / max(‖g‖_global, c)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from bigbatch._checks import check_in_range, check_nonnegative, check_positive
from bigbatch.optim._base import FusedSpec, TrustRatioOptimizer
from bigbatch.optim._common import tensor_norms, trust_ratio

__all__ = ["LAMB", "lamb_single", "lamb_foreach", "lamb_ratio"]


def lamb_ratio(wn: Tensor, un: Tensor, trust_clip: tuple[float, float] | None) -> Tensor:
    """``φ(‖w‖)/‖u‖``; 1 when ‖w‖ or ‖u‖ is 0 (tested on the raw ‖w‖, before φ's clamp)."""
    if trust_clip is None:
        return trust_ratio(wn, un)
    return torch.where(wn > 0, trust_ratio(wn.clamp(trust_clip[0], trust_clip[1]), un), torch.ones_like(wn))


def lamb_single(ws, gs, ms, vs, steps, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adapt, trust_clip,
                shards=None):
    """Plain per-tensor loop of Alg. 2 (float32 ``ws`` updated in place; ``gs`` only read)."""
    for k, (w, g, m, v, t) in enumerate(zip(ws, gs, ms, vs, steps)):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1**t if bias_correction else 1.0
        bc2 = 1 - beta2**t if bias_correction else 1.0
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        if weight_decay:
            u.add_(w, alpha=weight_decay)
        if adapt:
            norms = tensor_norms([w, u], like=None if shards is None else [shards[k]] * 2)
            u.mul_(lamb_ratio(norms[0], norms[1], trust_clip))
        w.add_(u, alpha=-lr)


def lamb_foreach(ws, gs, ms, vs, steps, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adapt, trust_clip,
                 shards=None):
    """The same update with ``torch._foreach_*`` ops: one kernel per op over all tensors."""
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, gs, alpha=1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    if bias_correction:
        bc1 = [1 - beta1**t for t in steps]
        rbc2 = [math.sqrt(1 - beta2**t) for t in steps]
    else:
        bc1 = rbc2 = [1.0] * len(steps)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, rbc2)  # √(v / bc2) = √v / √bc2
    torch._foreach_add_(denom, eps)
    us = torch._foreach_div(ms, denom)
    torch._foreach_div_(us, bc1)
    if weight_decay:
        torch._foreach_add_(us, ws, alpha=weight_decay)
    if adapt:
        wn, un = tensor_norms(ws, like=shards), tensor_norms(us, like=shards)
        ratios = lamb_ratio(wn, un, trust_clip)
        torch._foreach_mul_(us, list(ratios.to(us[0].device).unbind()))
    torch._foreach_add_(ws, us, alpha=-lr)


class LAMB(TrustRatioOptimizer):
    """LAMB as a ``torch.optim.Optimizer`` (see the module docstring for the equations).

    Args:
        params: parameters or param groups (see :func:`bigbatch.optim.param_groups`).
        lr: learning rate (> 0). betas: (β1, β2) in [0, 1). eps: ε > 0 added to √v̂.
        weight_decay: λ ≥ 0 (default 0, as MERIT, LARS and ``create_optimizer("lamb")``; BERT used
            0.01), decoupled, inside the trust-ratio numerator's update ``u``.
        bias_correction: divide the moments by (1−β^t) (Alg. 2 does; BERT's code did not).
        trust_clip: ``(γ_l, γ_u)`` to clamp ‖w‖ (φ of the paper); None for the identity.
        grad_prenorm: global gradient-norm bound applied before the moments, or None.
        adapt: per-group; False forces the trust ratio to 1.
        foreach / fused: like ``torch.optim.AdamW``; fused (Triton) is the default on CUDA.
        master_weights: keep a float32 copy of bf16/fp16 parameters in the state.
        nonfinite: ``"raise"`` or ``"skip"`` on nan/inf gradients (see ``bigbatch.optim._base``).
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    fused_spec = FusedSpec(tables="chunks", reduction="sum", launch="bigbatch.optim._fused.kernels:launch_lamb")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        trust_clip: tuple[float, float] | None = None,
        grad_prenorm: float | None = None,
        adapt: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        master_weights: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        b1 = check_in_range("betas[0]", betas[0], 0.0, 1.0)
        b2 = check_in_range("betas[1]", betas[1], 0.0, 1.0)
        check_positive("eps", eps)
        if trust_clip is not None:
            lo, hi = (check_nonnegative("trust_clip[0]", trust_clip[0]), check_positive("trust_clip[1]", trust_clip[1]))
            if lo > hi:
                raise ValueError(f"trust_clip must satisfy lo <= hi, got {trust_clip!r}")
            trust_clip = (lo, hi)
        if grad_prenorm is not None:
            check_positive("grad_prenorm", grad_prenorm)
        self.grad_prenorm = grad_prenorm
        defaults = dict(
            lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
            bias_correction=bool(bias_correction), trust_clip=trust_clip, adapt=bool(adapt),
        )
        super().__init__(params, defaults, foreach=foreach, fused=fused, master_weights=master_weights, nonfinite=nonfinite)

    def _grad_scale(self, grads: list[Tensor]) -> Tensor | None:
        if self.grad_prenorm is None:
            return None
        gnorm = tensor_norms(grads).square().sum().sqrt()
        return self.grad_prenorm / torch.clamp(gnorm, min=self.grad_prenorm)

    def _update(self, group: dict[str, Any], ws: list[Tensor], gs: list[Tensor], states: list[dict], shards=None) -> None:
        fn = lamb_single if group["foreach"] is False else lamb_foreach
        fn(
            ws, gs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [float(s["step"]) for s in states],
            lr=float(group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
            adapt=group["adapt"], trust_clip=group["trust_clip"], shards=shards,
        )

"""LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks", Alg. 1,
eqs. 6-7), with LARC's clipping mode (NVIDIA apex) and a Nesterov option.

Per tensor ``w`` with gradient ``g``, weight decay β, trust coefficient η, momentum m, lr γ::

    ratio = η‖w‖ / (‖g‖ + β‖w‖ + ε)      (1 if ‖w‖ or ‖g‖ is 0)
    clip=True (LARC):  ratio ← min(ratio / γ, 1)

    momentum_convention="paper" (default; Alg. 1, the LR inside the momentum buffer):
        d = γ · ratio · (g + β w)
        v ← m v + d;   w ← w − v             (Nesterov: w ← w − (d + m v))
    momentum_convention="torch" (torch.optim.SGD, timm's Lars, pytorch_optimizer's LARS):
        d = ratio · (g + β w)
        v ← m v + d;   w ← w − γ v           (Nesterov: w ← w − γ (d + m v))

The two are the same run while γ is constant. When γ changes (a schedule, an LR drop), "paper"
keeps the old γ in the velocity, which then decays over ~1/(1−m) steps, while "torch" applies
the new γ to the whole velocity at once; a user moving from timm takes "torch" to get the same
run. ``adapt=False`` forces ratio = 1: SGD with momentum and L2 weight decay; with "torch" it
equals torch.optim.SGD under any LR schedule, with "paper" for a constant LR.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from bigbatch._checks import check_choice, check_in_range, check_nonnegative, check_positive
from bigbatch.optim._base import FusedSpec, TrustRatioOptimizer
from bigbatch.optim._common import tensor_norms, trust_ratio

__all__ = ["LARS", "MOMENTUM_CONVENTIONS", "lars_single", "lars_foreach", "lars_ratio"]

MOMENTUM_CONVENTIONS = ("paper", "torch")
"""Where LARS applies the LR: inside the momentum buffer (paper) or to the buffer (torch)."""


def lars_ratio(wn: Tensor, gn: Tensor, *, lr, trust_coefficient, weight_decay, eps, clip) -> Tensor:
    """Eq. 6's local learning rate (per tensor), with the zero-norm rule and LARC's clip."""
    ratio = trust_ratio(trust_coefficient * wn, gn + weight_decay * wn + eps)
    # The zero rule keys on ‖g‖ (not on the ε-padded denominator): a zero gradient gives 1.
    ratio = torch.where(gn > 0, ratio, torch.ones_like(ratio))
    if clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def lars_single(ws, gs, bufs, *, lr, momentum, weight_decay, trust_coefficient, eps, clip, nesterov, adapt,
                lr_in_momentum=True, shards=None):
    """Plain per-tensor loop (float32 ``ws`` updated in place; ``gs`` only read).

    ``lr_in_momentum``: True is the "paper" convention (γ scales ``d`` before the buffer), False
    the "torch" one (γ scales the step taken from the buffer)."""
    lr_in, lr_out = (lr, 1.0) if lr_in_momentum else (1.0, lr)
    for k, (w, g, v) in enumerate(zip(ws, gs, bufs)):
        d = g.add(w, alpha=weight_decay) if weight_decay else g.clone()
        if adapt:
            n = tensor_norms([w, g], like=None if shards is None else [shards[k]] * 2)
            d.mul_(lr_in * lars_ratio(n[0], n[1], lr=lr, trust_coefficient=trust_coefficient,
                                      weight_decay=weight_decay, eps=eps, clip=clip).to(d.device))
        elif lr_in != 1.0:
            d.mul_(lr_in)
        if momentum:
            v.mul_(momentum).add_(d)
            d = d.add(v, alpha=momentum) if nesterov else v
        w.sub_(d, alpha=lr_out) if lr_out != 1.0 else w.sub_(d)


def lars_foreach(ws, gs, bufs, *, lr, momentum, weight_decay, trust_coefficient, eps, clip, nesterov, adapt,
                 lr_in_momentum=True, shards=None):
    """The same update with ``torch._foreach_*`` ops."""
    lr_in, lr_out = (lr, 1.0) if lr_in_momentum else (1.0, lr)
    ds = torch._foreach_add(gs, ws, alpha=weight_decay) if weight_decay else torch._foreach_mul(gs, 1.0)
    if adapt:
        ratio = lars_ratio(tensor_norms(ws, like=shards), tensor_norms(gs, like=shards), lr=lr, trust_coefficient=trust_coefficient,
                           weight_decay=weight_decay, eps=eps, clip=clip)
        torch._foreach_mul_(ds, list((lr_in * ratio).to(ds[0].device).unbind()))
    elif lr_in != 1.0:
        torch._foreach_mul_(ds, lr_in)
    if momentum:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, ds)
        if nesterov:
            torch._foreach_add_(ds, bufs, alpha=momentum)
        else:
            ds = bufs
    if lr_out != 1.0:
        torch._foreach_sub_(ws, ds, alpha=lr_out)
    else:
        torch._foreach_sub_(ws, ds)


class LARS(TrustRatioOptimizer):
    """LARS as a ``torch.optim.Optimizer`` (equations in the module docstring).

    Args:
        lr: γ > 0. momentum: m in [0, 1). weight_decay: β ≥ 0 (L2, inside the ratio's denominator).
        trust_coefficient: η > 0 (default 0.001). eps: ε ≥ 0 (default 1e-8).
        clip: LARC clipping ``min(ratio/γ, 1)``. nesterov: Nesterov momentum (needs momentum > 0).
        adapt: per-group; False forces the ratio to 1.
        momentum_convention: ``"paper"`` (default: the LR inside the momentum buffer, You et al.
            2017 Alg. 1) or ``"torch"`` (the LR applied to the buffer, as torch.optim.SGD, timm's
            Lars and pytorch_optimizer's LARS do); identical at a constant LR, different after
            an LR change (module docstring). Per group.
        foreach / fused / master_weights / nonfinite: as for :class:`bigbatch.optim.LAMB`.
    """

    state_keys = ("momentum_buffer",)
    fused_spec = FusedSpec(tables="chunks", reduction="sum", launch="bigbatch.optim._fused.kernels:launch_lars")

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
        nesterov: bool = False,
        adapt: bool = True,
        momentum_convention: str = "paper",
        foreach: bool | None = None,
        fused: bool | None = None,
        master_weights: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        check_in_range("momentum", momentum, 0.0, 1.0)
        check_positive("trust_coefficient", trust_coefficient)
        check_nonnegative("eps", eps)
        check_choice("momentum_convention", momentum_convention, MOMENTUM_CONVENTIONS)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, clip=bool(clip), nesterov=bool(nesterov), adapt=bool(adapt),
            momentum_convention=momentum_convention,
        )
        super().__init__(params, defaults, foreach=foreach, fused=fused, master_weights=master_weights, nonfinite=nonfinite)

    def _update(self, group: dict[str, Any], ws: list[Tensor], gs: list[Tensor], states: list[dict], shards=None) -> None:
        fn = lars_single if group["foreach"] is False else lars_foreach
        conv = check_choice("momentum_convention", group.get("momentum_convention", "paper"), MOMENTUM_CONVENTIONS)
        fn(
            ws, gs, [s["momentum_buffer"] for s in states],
            lr=float(group["lr"]), momentum=group["momentum"], weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"], eps=group["eps"], clip=group["clip"],
            nesterov=group["nesterov"], adapt=group["adapt"],
            lr_in_momentum=conv == "paper", shards=shards,
        )

"""A fused trust-ratio optimizer defined outside the bigbatch package, in one file: the optimizer
class (reference math + its ``FusedSpec``), its Triton kernel with the launch function, and its
registry record ``FROMAGE``. The fused tests (tests/test_optim_fused*.py) register it and run it
through the same registry-driven cases as LARS, LAMB and MERIT.

Fromage (Bernstein, Vahdat, Yue, Liu 2020, "On the distance between two neural networks and the
stability of learning", Algorithm 1; the authors' code ``jxbz/fromage``), per tensor::

    d = g + λ w                                   (λ = 0 in the paper: L2 decay is this file's option)
    w ← (w − lr · (‖w‖ / ‖d‖) · d) / √(1 + lr²)    (ratio 1 where ‖w‖ or ‖d‖ is 0)

``adapt=False`` forces the ratio to 1 (what ``param_groups`` asks for 1-D parameters).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from bigbatch.optim import OptimizerInfo
from bigbatch.optim._base import FusedSpec, TrustRatioOptimizer
from bigbatch.optim._common import tensor_norms, trust_ratio


def fromage_foreach(ws, gs, *, lr, weight_decay, adapt, shards=None):
    """The reference update (float32 ``ws`` in place; ``gs`` only read)."""
    ds = torch._foreach_add(gs, ws, alpha=weight_decay) if weight_decay else torch._foreach_mul(gs, 1.0)
    if adapt:
        ratio = trust_ratio(tensor_norms(ws, like=shards), tensor_norms(ds, like=shards))
        torch._foreach_mul_(ds, list(ratio.to(ds[0].device).unbind()))
    torch._foreach_add_(ws, ds, alpha=-lr)
    torch._foreach_div_(ws, math.sqrt(1.0 + lr * lr))


class Fromage(TrustRatioOptimizer):
    """Fromage (Bernstein et al. 2020, Alg. 1), with an optional L2 weight decay inside ``d``."""

    state_keys = ()
    fused_spec = FusedSpec(tables="chunks", reduction="sum", launch="ext_fused_optim:launch")

    def __init__(self, params: Iterable, lr: float = 1e-2, weight_decay: float = 0.0, *, adapt: bool = True,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = False,
                 nonfinite: str = "raise") -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, adapt=bool(adapt)), foreach=foreach,
                         fused=fused, master_weights=master_weights, nonfinite=nonfinite)

    def _update(self, group: dict[str, Any], ws: list[Tensor], gs: list[Tensor], states: list[dict], shards=None) -> None:
        fromage_foreach(ws, gs, lr=float(group["lr"]), weight_decay=group["weight_decay"], adapt=group["adapt"],
                        shards=shards)


FROMAGE = OptimizerInfo(
    "fromage", Fromage, "other", None, {}, "Fromage: per-tensor ‖w‖/‖g‖ ratio, then a 1/√(1+lr²) shrink",
    layerwise=True, foreach=True, fused=True, paper="Bernstein et al. 2020 (NeurIPS), Algorithm 1",
)
"""Its registry record (``register_optimizer(FROMAGE)``)."""


try:  # the kernel needs Triton; the optimizer itself does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs Triton
    triton = None

if triton is not None:
    from bigbatch.optim._fused.kernels import _chunk, _load_w, _norms, _store_w, _sumsq_and_flag

    @triton.jit
    def fromage_kernel(P, G, MASTER, OFF, NUMEL, CH_TID, CH_START, ACC, FLAG, lr, wd, shrink,
                       PASS: tl.constexpr, ADAPT: tl.constexpr, HAS_MASTER: tl.constexpr, PDT: tl.constexpr,
                       VEC: tl.constexpr, BLOCK: tl.constexpr):
        tid, off, idx, mask, pp, g = _chunk(P, G, CH_TID, CH_START, NUMEL, OFF, FLAG, PASS, PDT, VEC, BLOCK)
        w = _load_w(pp, MASTER, off, idx, mask, HAS_MASTER)
        d = g + wd * w
        if PASS == 1:
            _sumsq_and_flag(ACC, FLAG, tid, w, d, g, ADAPT)
        else:
            ratio = 1.0
            if ADAPT:
                wn, dn = _norms(ACC, tid)
                ok = (wn > 0) & (dn > 0)
                ratio = tl.where(ok, wn / tl.where(ok, dn, 1.0), 1.0)
            _store_w(pp, MASTER, off, idx, mask, (w - lr * (ratio * d)) / shrink, HAS_MASTER)


def launch(pack: Any, group: dict, pass_: int, flag: Tensor, gscale: Tensor | None) -> None:
    """One pass of Fromage on a ``"chunks"`` pack."""
    lr = float(group["lr"])
    fromage_kernel[(pack.ch_tid.numel(),)](
        pack.p_table, pack.g_table, pack.master_arg, pack.off, pack.numel, pack.ch_tid, pack.ch_start, pack.acc, flag,
        lr, group["weight_decay"], math.sqrt(1.0 + lr * lr),
        PASS=pass_, ADAPT=group["adapt"], HAS_MASTER=pack.master is not None, PDT=pack.pdt, VEC=pack.vec,
        BLOCK=pack.block, num_warps=pack.warps,
    )

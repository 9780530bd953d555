"""Conventions other libraries use, reproduced exactly (issue 16).

* LARS's momentum convention: ``"paper"`` (You et al. 2017, Alg. 1: the LR inside the momentum
  buffer) and ``"torch"`` (torch.optim.SGD, timm's ``Lars``, pytorch_optimizer's ``LARS``: the LR
  applied to the buffer), each against a float64 reference written from its equations, across an
  LR drop (where the two differ); ``"torch"`` against a hand-written float64 transcription of
  timm's ``Lars.step`` and, with ``adapt=False``, against ``torch.optim.SGD``.
* LAMB with ``adapt=False`` is ``torch.optim.AdamW`` (decoupled decay), under a changing LR too.
"""

import numpy as np
import pytest
import torch

from bigbatch.optim import LAMB, LARS

SHAPES = [(7,), (5, 6), (3, 4, 2), (4,)]
LRS = [0.7] * 8 + [0.07] * 8  # the drop: 0.7 -> 0.07 mid-run


def _grads(t):
    rng = np.random.default_rng(500 + t)
    return [rng.standard_normal(s) for s in SHAPES]


def _step_both(a, b, ps_a, ps_b, lrs):
    """Step optimizers ``a`` and ``b`` side by side with the same gradients, at LR ``lrs[t]`` on step t."""
    for t, lr in enumerate(lrs):
        for o in (a, b):
            for g in o.param_groups:
                g["lr"] = lr
        for pa, pb, g in zip(ps_a, ps_b, _grads(t)):
            pa.grad, pb.grad = torch.tensor(g), torch.tensor(g)
        a.step()
        b.step()


def _init():
    rng = np.random.default_rng(11)
    return [rng.standard_normal(s) for s in SHAPES]


def ref_lars(lrs, m, beta, eta, eps, convention, nesterov=False, clip=False, adapt=True):
    """Float64 LARS from the module's equations, one LR per step."""
    ws = _init()
    vs = [np.zeros_like(w) for w in ws]
    for t, lr in enumerate(lrs):
        for w, g, v in zip(ws, _grads(t), vs):
            nw, ng = np.linalg.norm(w), np.linalg.norm(g)
            ratio = eta * nw / (ng + beta * nw + eps) if (nw > 0 and ng > 0) else 1.0
            if clip:
                ratio = min(ratio / lr, 1.0)
            if not adapt:
                ratio = 1.0
            scale_in, scale_out = (lr, 1.0) if convention == "paper" else (1.0, lr)
            d = scale_in * ratio * (g + beta * w)
            v *= m
            v += d
            w -= scale_out * ((d + m * v) if nesterov else v)
    return ws


def timm_lars(lrs, momentum, weight_decay, trust_coeff, eps, nesterov=False, trust_clip=False):
    """timm's ``Lars.step`` (timm/optim/lars.py) transcribed to float64 NumPy, dampening 0:
    decay added to the gradient, the trust ratio scales it, the SGD momentum buffer (initialised
    to the first update) accumulates it, and ``p -= lr * buf``."""
    ws = _init()
    bufs: list = [None] * len(ws)
    for t, lr in enumerate(lrs):
        for i, (p, grad) in enumerate(zip(ws, _grads(t))):
            w_norm, g_norm = np.linalg.norm(p), np.linalg.norm(grad)
            trust_ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)
            trust_ratio = trust_ratio if (w_norm > 0 and g_norm > 0) else 1.0
            if trust_clip:
                trust_ratio = min(trust_ratio / lr, 1.0)
            grad = (grad + weight_decay * p) * trust_ratio
            if bufs[i] is None:
                bufs[i] = grad.copy()
            else:
                bufs[i] = momentum * bufs[i] + grad
            grad = grad + momentum * bufs[i] if nesterov else bufs[i]
            p -= lr * grad
    return ws


def run_lars(lrs, **kw):
    ps = [torch.nn.Parameter(torch.tensor(w)) for w in _init()]
    opt = LARS(ps, lr=lrs[0], **kw)
    for t, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        for p, g in zip(ps, _grads(t)):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in ps]


def _rel(got, want):
    return max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(got, want))


KW = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, eps=1e-8)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("convention", ["paper", "torch"])
@pytest.mark.parametrize("extra", [{}, {"nesterov": True}, {"clip": True}])
def test_lars_both_conventions_match_float64_reference_across_lr_drop(convention, foreach, extra):
    got = run_lars(LRS, momentum_convention=convention, foreach=foreach, **KW, **extra)
    want = ref_lars(LRS, KW["momentum"], KW["weight_decay"], KW["trust_coefficient"], KW["eps"], convention,
                    nesterov=extra.get("nesterov", False), clip=extra.get("clip", False))
    assert _rel(got, want) < 1e-10


def test_lars_conventions_agree_at_constant_lr_and_differ_after_a_drop():
    same = [run_lars([0.7] * 12, momentum_convention=c, **KW) for c in ("paper", "torch")]
    assert _rel(same[0], same[1]) < 1e-12
    paper, torch_ = (run_lars(LRS, momentum_convention=c, **KW) for c in ("paper", "torch"))
    # After the drop the paper form keeps the old LR in the buffer for ~1/(1-m) steps: a large gap.
    assert _rel(paper, torch_) > 1e-2


@pytest.mark.parametrize("extra", [{}, {"nesterov": True}, {"clip": True}])
def test_lars_torch_convention_is_timm_lars(extra):
    got = run_lars(LRS, momentum_convention="torch", **KW, **extra)
    want = timm_lars(LRS, KW["momentum"], KW["weight_decay"], KW["trust_coefficient"], KW["eps"],
                     nesterov=extra.get("nesterov", False), trust_clip=extra.get("clip", False))
    assert _rel(got, want) < 1e-10


def test_lars_torch_convention_without_adaptation_is_torch_sgd_under_an_lr_schedule():
    ps_a = [torch.nn.Parameter(torch.tensor(w)) for w in _init()]
    ps_b = [torch.nn.Parameter(torch.tensor(w)) for w in _init()]
    a = LARS(ps_a, lr=0.7, momentum=0.9, weight_decay=1e-2, adapt=False, momentum_convention="torch")
    b = torch.optim.SGD(ps_b, lr=0.7, momentum=0.9, weight_decay=1e-2)
    _step_both(a, b, ps_a, ps_b, LRS)
    for pa, pb in zip(ps_a, ps_b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_lars_momentum_convention_is_validated_and_survives_state_dict():
    with pytest.raises(ValueError, match="momentum_convention.*valid: paper, torch"):
        LARS([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum_convention="timm")
    p = torch.nn.Parameter(torch.ones(3))
    opt = LARS([p], lr=0.1, momentum_convention="torch")
    opt2 = LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["momentum_convention"] == "torch"


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_without_adaptation_is_torch_adamw(foreach):
    # The docstring says so: adapt=False gives w <- w - lr (m̂/(√v̂+ε) + λw) = AdamW's update
    # (decoupled decay with the lr in it). Checked under a changing LR and two betas.
    torch.manual_seed(0)
    w0 = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    ps_a = [torch.nn.Parameter(w.clone()) for w in w0]
    ps_b = [torch.nn.Parameter(w.clone()) for w in w0]
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    a = LAMB(ps_a, adapt=False, foreach=foreach, **kw)
    b = torch.optim.AdamW(ps_b, **kw)
    _step_both(a, b, ps_a, ps_b, [0.01 if t < 12 else 0.002 for t in range(24)])
    for pa, pb in zip(ps_a, ps_b):
        torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-14)

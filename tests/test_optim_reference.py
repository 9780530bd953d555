"""Each optimizer against a float64 NumPy implementation written from the papers' equations,
plus cases with a closed-form answer. The references below are deliberately written without
reusing any bigbatch code."""

import math

import numpy as np
import pytest
import torch

from bigbatch.optim import LAMB, LARS, MERIT

SHAPES = [(7,), (5, 6), (3, 4, 2, 2), (4, 3), (6,)]
ZERO_W = 3  # this tensor starts at exactly 0 (trust ratio 1 on the first step)
ZERO_G = 4  # this tensor's gradient is always 0
STEPS = 32


def _grads(step):
    rng = np.random.default_rng(1000 + step)
    gs = [rng.standard_normal(s) for s in SHAPES]
    gs[ZERO_G][:] = 0.0
    return gs


def _init():
    rng = np.random.default_rng(7)
    ws = [rng.standard_normal(s) for s in SHAPES]
    ws[ZERO_W][:] = 0.0
    return ws


# ---------------------------------------------------------------- float64 references
def ref_lars(ws, steps, lr, m, beta, eta, eps, clip=False, nesterov=False, adapt=True):
    ws = [w.copy() for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t in range(steps):
        for w, g, v in zip(ws, _grads(t), vs):
            nw, ng = np.sqrt((w * w).sum()), np.sqrt((g * g).sum())
            ratio = eta * nw / (ng + beta * nw + eps) if (nw > 0 and ng > 0) else 1.0
            if clip:
                ratio = min(ratio / lr, 1.0)
            if not adapt:
                ratio = 1.0
            d = lr * ratio * (g + beta * w)
            v *= m
            v += d
            w -= (d + m * v) if nesterov else v
    return ws


def ref_lamb(ws, steps, lr, b1, b2, eps, lam, bias=True, clip=None, prenorm=None, adapt=True):
    ws = [w.copy() for w in ws]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t in range(1, steps + 1):
        gs = _grads(t - 1)
        if prenorm is not None:
            gn = math.sqrt(sum((g * g).sum() for g in gs))
            gs = [g * prenorm / max(gn, prenorm) for g in gs]
        for w, g, m, v in zip(ws, gs, ms, vs):
            m[:] = b1 * m + (1 - b1) * g
            v[:] = b2 * v + (1 - b2) * g * g
            mh = m / (1 - b1**t) if bias else m
            vh = v / (1 - b2**t) if bias else v
            u = mh / (np.sqrt(vh) + eps) + lam * w
            nw, nu = np.sqrt((w * w).sum()), np.sqrt((u * u).sum())
            phi = nw if clip is None else min(max(nw, clip[0]), clip[1])
            ratio = phi / nu if (nw > 0 and nu > 0) else 1.0
            w -= lr * (ratio if adapt else 1.0) * u
    return ws


def ref_merit(ws, steps, lr, b1, b2, eps, lam, adapt=True):
    ws = [w.copy() for w in ws]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t in range(steps):
        for w, g, m, v in zip(ws, _grads(t), ms, vs):
            m[:] = b1 * m + (1 - b1) * g
            v[:] = b2 * v + (1 - b2) * g * g
            u = m / (np.sqrt(v) + eps) + lam * w
            aw, au = np.abs(w), np.abs(u)
            if not adapt:
                tr = np.ones_like(w)
            elif w.ndim >= 2:
                rw, ru = aw.max(axis=1, keepdims=True), au.max(axis=1, keepdims=True)
                cw, cu = aw.max(axis=0, keepdims=True), au.max(axis=0, keepdims=True)
                with np.errstate(divide="ignore", invalid="ignore"):
                    tr = np.maximum(np.broadcast_to(rw / ru, w.shape), np.broadcast_to(cw / cu, w.shape))
                    tr = np.maximum(tr, aw.max() / au.max())
                zero = (np.broadcast_to(rw, w.shape) == 0) | (np.broadcast_to(ru, w.shape) == 0)
                zero |= (np.broadcast_to(cw, w.shape) == 0) | (np.broadcast_to(cu, w.shape) == 0)
                tr = np.where(zero, 1.0, tr)
            else:
                tr = aw.max() / au.max() if (aw.max() > 0 and au.max() > 0) else 1.0
            w -= lr * np.clip(u * tr, -1.0, 1.0)
    return ws


# ---------------------------------------------------------------- runner
def run_torch(cls, steps, dtype=torch.float64, **kw):
    ps = [torch.nn.Parameter(torch.tensor(w, dtype=dtype)) for w in _init()]
    opt = cls(ps, **kw)
    for t in range(steps):
        for p, g in zip(ps, _grads(t)):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return [p.detach().double().numpy() for p in ps], opt


def assert_close(got, want, rtol=1e-10):
    for i, (a, b) in enumerate(zip(got, want)):
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
        assert err < rtol, f"tensor {i} shape {b.shape}: rel err {err:.3e}"


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-8),
        dict(lr=0.5, momentum=0.9, weight_decay=0.0, trust_coefficient=0.02, eps=1e-8, nesterov=True),
        dict(lr=2.0, momentum=0.8, weight_decay=1e-2, trust_coefficient=0.5, eps=1e-8, clip=True),
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.01, eps=1e-8, adapt=False),
    ],
)
def test_lars_matches_float64_reference(kw, foreach):
    got, _ = run_torch(LARS, STEPS, foreach=foreach, **kw)
    want = ref_lars(_init(), STEPS, kw["lr"], kw["momentum"], kw["weight_decay"], kw["trust_coefficient"],
                    kw["eps"], kw.get("clip", False), kw.get("nesterov", False), kw.get("adapt", True))
    assert_close(got, want)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
        dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, bias_correction=False),
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, trust_clip=(0.5, 2.0)),
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, grad_prenorm=1.0),
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, adapt=False),
    ],
)
def test_lamb_matches_float64_reference(kw, foreach):
    got, _ = run_torch(LAMB, STEPS, foreach=foreach, **kw)
    want = ref_lamb(_init(), STEPS, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"],
                    kw.get("bias_correction", True), kw.get("trust_clip"), kw.get("grad_prenorm"), kw.get("adapt", True))
    assert_close(got, want)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0),
        dict(lr=0.05, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1),
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, adapt=False),
    ],
)
def test_merit_matches_float64_reference(kw, foreach):
    got, _ = run_torch(MERIT, STEPS, foreach=foreach, **kw)
    want = ref_merit(_init(), STEPS, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"], kw.get("adapt", True))
    assert_close(got, want)


def test_merit_clip_binds_in_the_reference_run():
    # Guard against a vacuous MERIT test: the clip to [-1, 1] must actually bind somewhere.
    ws = _init()
    m, v = np.zeros_like(ws[1]), np.zeros_like(ws[1])
    g = _grads(0)[1]
    m[:] = 0.1 * g
    v[:] = 0.001 * g * g
    u = m / (np.sqrt(v) + 1e-6)
    rw = np.abs(ws[1]).max(axis=1, keepdims=True) / np.abs(u).max(axis=1, keepdims=True)
    assert (np.abs(u * rw) > 1).any()


# ---------------------------------------------------------------- closed forms
def _one_step(cls, w, g, **kw):
    p = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    cls([p], **kw).step()
    return p.detach().numpy()


def test_lars_closed_form():
    # ‖w‖ = 5, ‖g‖ = 1, β = 0: ratio = η·5 = 0.005, v = lr·ratio·g, w1 = w − v.
    w1 = _one_step(LARS, [3.0, 4.0], [0.6, 0.8], lr=1.0, momentum=0.9, weight_decay=0.0, eps=0.0)
    np.testing.assert_allclose(w1, [3.0 - 0.003, 4.0 - 0.004], rtol=0, atol=1e-15)


def test_lamb_closed_form():
    # Step 1 with bias correction: m̂ = g, v̂ = g², u = g/(|g|+ε) ≈ sign(g); ratio = ‖w‖/‖u‖ = 5/√2.
    w1 = _one_step(LAMB, [3.0, 4.0], [1.0, -2.0], lr=0.1, eps=1e-12, weight_decay=0.0)
    np.testing.assert_allclose(w1, [3.0 - 0.1 * 5 / math.sqrt(2), 4.0 + 0.1 * 5 / math.sqrt(2)], rtol=1e-10)


def test_merit_closed_form_vector_and_matrix():
    # Step 1: u = 0.1g/(√0.001|g|) = √10·sign(g); t = max|w|/√10; u·t = 4·sign(g) → clip to ±1.
    w1 = _one_step(MERIT, [3.0, -4.0], [1.0, -2.0], lr=0.1, eps=1e-12)
    np.testing.assert_allclose(w1, [2.9, -3.9], rtol=1e-10)
    # A matrix whose |u| is one constant c: R = (2, 4)/c, C = (3, 4)/c, ρ = 4/c, so t·u = ±4 → ±1.
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    g = np.array([[1.0, -1.0], [2.0, 0.5]])
    np.testing.assert_allclose(_one_step(MERIT, w, g, lr=0.1, eps=1e-12), w - 0.1 * np.sign(g), rtol=1e-10)
    # Small weights: the ratio, not the clip, sets the step: w = 0.01·1, |u| = √10 → t·u = 0.01·sign(g).
    w = np.full((2, 2), 0.01)
    np.testing.assert_allclose(_one_step(MERIT, w, g, lr=0.5, eps=1e-12), w - 0.5 * 0.01 * np.sign(g), rtol=1e-9)


def test_zero_weight_tensor_gets_ratio_one():
    # A zero-initialised layer would never move with ratio η‖w‖/… = 0; the rule makes it 1.
    for cls, kw in [(LARS, dict(lr=0.1, momentum=0.0)), (LAMB, dict(lr=0.1, weight_decay=0.0))]:
        w1 = _one_step(cls, [0.0, 0.0], [0.6, 0.8], **kw)
        assert np.abs(w1).max() > 0.05, cls


def test_adapt_false_is_adamw_and_sgd():
    torch.manual_seed(0)
    w0 = torch.randn(5, 4, dtype=torch.float64)
    pairs = [
        (lambda ps: LAMB(ps, lr=0.01, eps=1e-8, weight_decay=0.1, adapt=False),
         lambda ps: torch.optim.AdamW(ps, lr=0.01, eps=1e-8, weight_decay=0.1)),
        (lambda ps: LARS(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, adapt=False),
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
    ]
    for ours, theirs in pairs:
        a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
        oa, ob = ours([a]), theirs([b])
        for t in range(20):
            g = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- subnormal updates (dead units)
def _merit_one_step_f64(w, m, v, lr, b1, b2, eps):
    """One MERIT step with a zero gradient, float64, from float32 state (the module's equations)."""
    w, m, v = (np.asarray(x, dtype=np.float64) for x in (w, m, v))
    m, v = b1 * m, b2 * v
    u = m / (np.sqrt(v) + eps)
    aw, au = np.abs(w), np.abs(u)
    if w.ndim >= 2:
        rw, ru = aw.max(axis=1, keepdims=True), au.max(axis=1, keepdims=True)
        cw, cu = aw.max(axis=0, keepdims=True), au.max(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            tr = np.maximum(np.maximum(rw / ru, cw / cu), aw.max() / au.max())
        tr = np.where((rw == 0) | (ru == 0) | (cw == 0) | (cu == 0), 1.0, tr)
    else:
        tr = aw.max() / au.max()
    return w - lr * np.clip(u * tr, -1.0, 1.0)


# CPU: the foreach and per-tensor paths; CUDA: the same two and the fused (Triton) kernel.
_PATHS = [
    pytest.param("cpu", dict(foreach=True), id="cpu-foreach"),
    pytest.param("cpu", dict(foreach=False), id="cpu-single"),
    pytest.param("cuda", dict(foreach=True), id="cuda-foreach", marks=pytest.mark.cuda),
    pytest.param("cuda", dict(fused=True), id="cuda-fused", marks=pytest.mark.cuda),
]


def _merit_dead_unit_step(w, m, v, device, path, lr=0.1, b1=0.9, b2=0.999, eps=1e-6):
    """One MERIT step with a zero gradient from the float32 state (w, m, v); returns (got, float64 want)."""
    p = torch.nn.Parameter(torch.tensor(w, device=device))
    opt = MERIT([p], lr=lr, betas=(b1, b2), eps=eps, **path)
    p.grad = torch.zeros_like(p)
    opt.step()  # creates the state; then put the dead-unit moments in place
    with torch.no_grad():
        p.copy_(torch.tensor(w))
    opt.state[p]["exp_avg"].copy_(torch.tensor(m))
    opt.state[p]["exp_avg_sq"].copy_(torch.tensor(v))
    opt.step()
    return p.detach().cpu().numpy(), _merit_one_step_f64(w, m, v, lr, b1, b2, eps)


@pytest.mark.parametrize(("device", "path"), _PATHS)
def test_merit_subnormal_momentum_row_gives_finite_exact_step(device, path):
    # A dead ReLU unit: its gradient row has been 0 long enough that the momentum row is subnormal
    # (~1e-40). Then t = max|w_row| / max|u_row| ≈ 5e39 exceeds float32's range; forming t gave inf,
    # 0 · inf = NaN where u is exactly 0, and the NaN reached the weights (MNIST-1D CNN, MERIT,
    # batch 128, lr 0.0018, step 1910). In exact arithmetic the row's step is u / max|u_row| · max|w_row|.
    w = np.array([[0.5, 0.1, -0.2, 0.3], [0.3, -0.7, 0.2, 0.4], [-0.6, 0.2, 0.9, -0.1]], dtype=np.float32)
    m = np.array([[2e-40, 0.0, -1e-40, 0.0], [0.02, -0.01, 0.03, 0.005], [-0.01, 0.02, 0.01, 0.03]], dtype=np.float32)
    v = np.ones_like(w) * np.float32(1e-4)
    v[0] = 1.0
    assert 0 < abs(m[0, 0]) < np.finfo(np.float32).tiny  # really subnormal
    got, want = _merit_dead_unit_step(w, m, v, device, path)
    assert np.isfinite(got).all()
    # Row 0 moves by lr · (0.5, 0, -0.25, 0): the ratio, not the clip, sets its step; zeros stay put.
    # (m[0] is stored as a float32 subnormal, so -1e-40 / 2e-40 is 0.5 only to ~1e-6.)
    np.testing.assert_allclose(want[0], w[0] - 0.1 * np.array([0.5, 0.0, -0.25, 0.0]), rtol=1e-5)
    # Subnormal u holds ~1e-5 relative precision; the rest of the step agrees to float32 rounding.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("device", "path"), _PATHS)
def test_merit_subnormal_momentum_vector_gives_finite_exact_step(device, path):
    # The same overflow for a vector (t = max|w| / max|u| over the whole tensor).
    w = np.array([1.0, -0.5, 0.25, 0.125], dtype=np.float32)
    m = np.array([1e-40, 0.0, -3e-41, 0.0], dtype=np.float32)
    got, want = _merit_dead_unit_step(w, m, np.ones_like(w), device, path)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(want, w - 0.1 * np.array([1.0, 0.0, -0.3, 0.0]), rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

"""NoiseScale: the estimator of McCandlish et al. 2018 App. A.1, against float64 references."""

import math
import random

import numpy as np
import pytest

from bigbatch.noise import NoiseScale, unbiased_estimates


def reference_estimates(small, big, b, B):
    """Solve E|G_b|² = |G|² + trΣ/b at the two batch sizes as a 2×2 linear system (float64)."""
    a = np.array([[1.0, 1.0 / b], [1.0, 1.0 / B]], dtype=np.float64)
    g2, tr = np.linalg.solve(a, np.array([small, big], dtype=np.float64))
    return g2, tr


@pytest.mark.parametrize("small,big,b,B", [(3.0, 1.5, 8, 64), (0.2, 0.9, 1, 2), (10.0, 9.99, 16.5, 100.0)])
def test_unbiased_estimates_match_linear_system(small, big, b, B):
    g2, tr = unbiased_estimates(small, big, b, B)
    rg2, rtr = reference_estimates(small, big, b, B)
    assert g2 == pytest.approx(rg2, rel=1e-12, abs=1e-12)
    assert tr == pytest.approx(rtr, rel=1e-12, abs=1e-12)


def test_exact_expectations_give_exact_answer():
    # Feeding the expectations themselves returns |G|² and trΣ exactly, for any b < B.
    G2, S = 0.7, 42.0
    for b, B in [(1, 2), (4, 64), (32, 33)]:
        g2, tr = unbiased_estimates(G2 + S / b, G2 + S / B, b, B)
        assert g2 == pytest.approx(G2, rel=1e-10)
        assert tr == pytest.approx(S, rel=1e-10)
        est = NoiseScale(beta=0.9)
        for _ in range(5):
            est.update(G2 + S / b, G2 + S / B, b, B)
        assert est.b_simple == pytest.approx(S / G2, rel=1e-10)


def test_ema_matches_float64_reference():
    rng = np.random.default_rng(0)
    beta = 0.95
    est = NoiseScale(beta=beta)
    m_g, m_t = 0.0, 0.0
    for n in range(1, 60):
        b, B = 8, 64
        small, big = rng.uniform(0.5, 3.0), rng.uniform(0.1, 1.0)
        g2, tr = reference_estimates(small, big, b, B)
        m_g = beta * m_g + (1 - beta) * g2
        m_t = beta * m_t + (1 - beta) * tr
        assert est.update(small, big, b, B)
        assert est.grad_sqnorm == pytest.approx(m_g / (1 - beta**n), rel=1e-9)
        assert est.trace_sigma == pytest.approx(m_t / (1 - beta**n), rel=1e-9)
        expect = m_t / m_g if m_g > 0 else math.nan
        if math.isnan(expect):
            assert math.isnan(est.b_simple)
        else:
            assert est.b_simple == pytest.approx(expect, rel=1e-9)
    assert est.n_updates == 59


@pytest.mark.parametrize("dim,b,B,seed", [(10, 4, 32, 0), (50, 8, 128, 1), (5, 2, 16, 2)])
def test_converges_to_closed_form_on_gaussian_gradients(dim, b, B, seed):
    """Per-example gradients g ~ N(G, diag(s²)): B_simple = Σ s² / |G|² exactly."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=dim)
    s = rng.uniform(0.5, 2.0, size=dim)
    truth = float((s**2).sum() / (G**2).sum())
    est = NoiseScale(beta=0.999)
    for _ in range(3000):
        # the mean of b examples is N(G, s²/b); the big batch contains the small one
        small_mean = G + s * rng.normal(size=dim) / math.sqrt(b)
        rest_mean = G + s * rng.normal(size=dim) / math.sqrt(B - b)
        big_mean = (b * small_mean + (B - b) * rest_mean) / B
        est.update(float(small_mean @ small_mean), float(big_mean @ big_mean), b, B)
    assert est.b_simple == pytest.approx(truth, rel=0.05)
    assert est.trace_sigma == pytest.approx(float((s**2).sum()), rel=0.05)


def test_negative_readings_are_kept():
    est = NoiseScale(beta=0.5)
    # |G_b|² < |G_B|²: a negative trΣ reading (happens by chance); it must enter the EMA.
    assert est.update(1.0, 2.0, 4, 16)
    assert est.n_updates == 1
    assert est.trace_sigma < 0
    assert est.last_trace_sigma == pytest.approx(reference_estimates(1.0, 2.0, 4, 16)[1])
    # |G|² reading negative: b_simple is nan while the EMA of |G|² is not positive.
    est2 = NoiseScale(beta=0.5)
    est2.update(10.0, 0.1, 4, 16)
    assert est2.grad_sqnorm < 0
    assert math.isnan(est2.b_simple)


def test_nan_before_first_update():
    est = NoiseScale()
    assert math.isnan(est.b_simple) and math.isnan(est.grad_sqnorm) and math.isnan(est.trace_sigma)
    assert est.n_updates == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_readings_are_skipped_not_folded(bad):
    est = NoiseScale(beta=0.9)
    est.update(3.0, 1.0, 4, 32)
    before = est.state_dict()
    assert est.update(bad, 1.0, 4, 32) is False
    assert est.update(3.0, bad, 4, 32) is False
    assert est.n_skipped == 2
    after = est.state_dict()
    after.pop("n_skipped"), before.pop("n_skipped")
    assert after == before


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(small_sqnorm=1.0, big_sqnorm=1.0, b_small=8, b_big=8), "b_big must be > b_small"),
        (dict(small_sqnorm=1.0, big_sqnorm=1.0, b_small=0, b_big=8), "b_small must be > 0"),
        (dict(small_sqnorm=1.0, big_sqnorm=1.0, b_small=2, b_big=math.nan), "b_big must be"),
        (dict(small_sqnorm=-1.0, big_sqnorm=1.0, b_small=2, b_big=8), "squared norms must be >= 0"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseScale().update(**kwargs)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, math.nan])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be"):
        NoiseScale(beta=beta)


def test_state_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    data = [(rng.uniform(1, 3), rng.uniform(0, 1), 4, 32) for _ in range(40)]
    a = NoiseScale(beta=0.9)
    for d in data[:20]:
        a.update(*d)
    b = NoiseScale(beta=0.5)
    b.load_state_dict(a.state_dict())
    assert b.beta == 0.9
    for d in data[20:]:
        a.update(*d)
        b.update(*d)
    assert a.state_dict() == b.state_dict()
    assert a.b_simple == b.b_simple


def test_load_rejects_corrupt_state():
    s = NoiseScale().state_dict()
    s["ema_g2"] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        NoiseScale().load_state_dict(s)


def _weighted_reference(readings, beta):
    """b_simple's relative standard error from the equations (float64, explicit weights)."""
    import numpy as np

    n = len(readings)
    w = np.array([beta ** (n - 1 - i) for i in range(n)])
    g = np.array([r[0] for r in readings])
    t = np.array([r[1] for r in readings])
    W, n_eff = w.sum(), w.sum() ** 2 / (w**2).sum()
    mg, mt = (w * g).sum() / W, (w * t).sum() / W
    vg, vt = (w * (g - mg) ** 2).sum() / W, (w * (t - mt) ** 2).sum() / W
    cov = (w * (g - mg) * (t - mt)).sum() / W
    return math.sqrt((vt / mt**2 + vg / mg**2 - 2 * cov / (mg * mt)) / (n_eff - 1)), n_eff


def test_b_simple_rse_matches_weighted_reference():
    rng = random.Random(3)
    est, readings = NoiseScale(beta=0.9), []
    assert est.b_simple_rse == math.inf and est.n_effective == 0
    for i in range(40):
        # readings with b = 32 < B = 128; solve for the norms that give chosen (g2, tr)
        g2, tr = 2.0 + rng.gauss(0, 0.3), 50.0 + rng.gauss(0, 8.0)
        small, big = g2 + tr / 32, g2 + tr / 128
        est.update(small, big, 32, 128)
        readings.append(unbiased_estimates(small, big, 32, 128))
        if i == 0:
            assert est.b_simple_rse == math.inf and est.n_effective == pytest.approx(1.0)  # one reading: no spread
    ref, n_eff = _weighted_reference(readings, 0.9)
    assert est.n_effective == pytest.approx(n_eff, rel=1e-12)
    assert est.b_simple_rse == pytest.approx(ref, rel=1e-6)


def test_b_simple_rse_predicts_the_spread_of_b_simple():
    # i.i.d. readings: the rse must match the run-to-run spread of b_simple (within sampling error)
    rng = random.Random(0)
    finals, rses = [], []
    for _ in range(300):
        est = NoiseScale(beta=0.95)
        for _ in range(60):
            g2, tr = 1.0 + rng.gauss(0, 0.25), 40.0 + rng.gauss(0, 10.0)
            est.update(g2 + tr / 16, g2 + tr / 64, 16, 64)
        finals.append(est.b_simple)
        rses.append(est.b_simple_rse)
    mean = sum(finals) / len(finals)
    sd = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1))
    assert sd / mean == pytest.approx(sorted(rses)[len(rses) // 2], rel=0.2)


def test_rse_survives_state_round_trip():
    a = NoiseScale(beta=0.8)
    for i in range(10):
        a.update(3.0 + 0.1 * i, 1.0 + 0.05 * (i % 3), 8, 64)
    b = NoiseScale()
    b.load_state_dict(a.state_dict())
    assert b.b_simple_rse == a.b_simple_rse and math.isfinite(a.b_simple_rse)

"""NoiseScale: the estimator of McCandlish et al. 2018 App. A.1, against float64 references."""

import math

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

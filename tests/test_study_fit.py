"""The critical-batch fit (McCandlish et al. 2018, eq. 2.11), its bootstrap and Shallue's regimes."""

import math

import numpy as np
import pytest

from bigbatch.study.fit import (
    REGIME_SLOPE,
    bootstrap_critical_batch,
    fit_critical_batch,
    regime,
    regime_bounds,
    samples_model,
    steps_model,
)

BS = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 2048], dtype=float)


def _synthetic(s_min, b_noise, seeds, sigma, rng):
    """Steps from the model with multiplicative (log-normal) noise, ``seeds`` points per batch size."""
    b = np.repeat(BS, seeds)
    s = steps_model(b, s_min, b_noise) * np.exp(rng.normal(0.0, sigma, size=b.size))
    return b, s


def _reference_fit(b, s):
    """Independent float64 reference: scipy least squares on the same log residuals."""
    from scipy.optimize import least_squares

    def resid(p):
        return np.log(s) - (p[0] + np.log1p(np.exp(p[1]) / b))

    r = least_squares(resid, x0=[np.log(s.min()), np.log(np.median(b))], xtol=1e-12, ftol=1e-12)
    return math.exp(r.x[0]), math.exp(r.x[1])


def test_exact_data_recovered_exactly():
    s = steps_model(BS, 250.0, 96.0)
    fit = fit_critical_batch(BS, s)
    assert fit.s_min == pytest.approx(250.0, rel=1e-4)
    assert fit.b_noise == pytest.approx(96.0, rel=1e-4)
    assert fit.e_min == pytest.approx(250.0 * 96.0, rel=1e-4)
    assert fit.b_crit == pytest.approx(fit.e_min / fit.s_min)
    assert fit.rmse_log < 1e-5 and not fit.at_edge


@pytest.mark.parametrize("s_min,b_noise", [(300.0, 128.0), (40.0, 900.0), (2000.0, 20.0)])
def test_noisy_data_recovers_parameters(s_min, b_noise):
    rng = np.random.default_rng(1)
    b, s = _synthetic(s_min, b_noise, seeds=3, sigma=0.05, rng=rng)
    fit = fit_critical_batch(b, s)
    assert fit.s_min == pytest.approx(s_min, rel=0.1)
    assert fit.b_noise == pytest.approx(b_noise, rel=0.2)
    ref_s, ref_b = _reference_fit(b, s)
    assert fit.s_min == pytest.approx(ref_s, rel=1e-3)
    assert fit.b_noise == pytest.approx(ref_b, rel=1e-3)


def test_samples_fit_is_the_same_fit():
    """E = B·S: fitting E(B) = E_min(1 + B/B_noise) in log space gives the same parameters."""
    rng = np.random.default_rng(2)
    b, s = _synthetic(300.0, 128.0, seeds=2, sigma=0.1, rng=rng)
    fit = fit_critical_batch(b, s)
    e = b * s
    pred = samples_model(b, fit.e_min, fit.b_noise)
    pred_s = steps_model(b, fit.s_min, fit.b_noise)
    np.testing.assert_allclose(np.log(e) - np.log(pred), np.log(s) - np.log(pred_s), atol=1e-9)


def test_bootstrap_interval_covers_truth_and_shrinks_with_noise():
    rng = np.random.default_rng(3)
    b, s = _synthetic(300.0, 128.0, seeds=4, sigma=0.08, rng=rng)
    lo, hi = bootstrap_critical_batch(b, s, resamples=300, confidence=0.95)
    fit = fit_critical_batch(b, s)
    assert lo < fit.b_crit < hi
    assert lo < 128.0 < hi
    b2, s2 = _synthetic(300.0, 128.0, seeds=4, sigma=0.01, rng=rng)
    lo2, hi2 = bootstrap_critical_batch(b2, s2, resamples=300, confidence=0.95)
    assert hi2 / lo2 < hi / lo


def test_bootstrap_coverage_over_many_experiments():
    """A 90% interval should cover the true B_noise in most repeated synthetic experiments."""
    rng = np.random.default_rng(4)
    hits = 0
    for _ in range(40):
        b, s = _synthetic(300.0, 128.0, seeds=3, sigma=0.1, rng=rng)
        lo, hi = bootstrap_critical_batch(b, s, resamples=200, confidence=0.9, seed=int(rng.integers(1 << 30)))
        hits += lo <= 128.0 <= hi
    assert hits >= 30  # nominal 36; percentile bootstrap under-covers a little with 3 seeds


def test_bootstrap_single_seed_resamples_cells():
    rng = np.random.default_rng(5)
    b, s = _synthetic(300.0, 128.0, seeds=1, sigma=0.05, rng=rng)
    lo, hi = bootstrap_critical_batch(b, s, resamples=200)
    assert lo < 128.0 < hi
    assert bootstrap_critical_batch([8, 16], [100, 60], resamples=50) is None


def test_no_bend_is_reported_at_edge():
    b = BS
    s = 1e5 / b  # perfect scaling everywhere: B_noise is not identified from above
    assert fit_critical_batch(b, s).at_edge


def test_regimes_from_slope():
    lo, hi = regime_bounds(100.0)
    # d log S / d log B = -B_noise / (B + B_noise)
    assert -100.0 / (lo + 100.0) == pytest.approx(-(1 - REGIME_SLOPE))
    assert -100.0 / (hi + 100.0) == pytest.approx(-REGIME_SLOPE)
    assert regime(10, 100.0) == "perfect scaling"
    assert regime(100, 100.0) == "diminishing returns"
    assert regime(1000, 100.0) == "maximal data parallelism"


@pytest.mark.parametrize(
    "b,s,match",
    [
        ([8, 16, 32], [1, 2], "same length"),
        ([8, 0, 32], [1, 2, 3], "batch_sizes"),
        ([8, 16, 32], [1, float("nan"), 3], "steps"),
        ([8, 8, 8], [1, 2, 3], "2 distinct"),
    ],
)
def test_bad_input(b, s, match):
    with pytest.raises(ValueError, match=match):
        fit_critical_batch(b, s)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_critical_batch([8, 16, 32], [3, 2, 1], confidence=1.5)

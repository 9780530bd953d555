"""The steps/samples trade-off model of McCandlish et al. 2018 and its fit to measured cells.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"), eq. 2.11: the steps
``S`` and examples ``E`` needed to reach a fixed target at batch size ``B`` follow ::

    S(B) = S_min (1 + B_noise / B),      E(B) = E_min (1 + B / B_noise),

equivalently ``(S/S_min − 1)(E/E_min − 1) = 1``, and the critical batch size is
``B_crit = E_min / S_min``. Because every measurement has ``E = B·S``, the two curves share
their parameters: ``E_min = S_min·B_noise``, so ``B_crit = B_noise``; and in log space
``log E − log B = log S`` makes the two least-squares fits *the same fit* (identical
residuals). We therefore fit once, in log space (the measurements span decades and their
scatter is multiplicative), and report ``E_min`` and ``B_crit`` from it.

For a fixed ``B_noise`` the best ``log S_min`` is the mean residual (closed form), so the fit
is a one-dimensional search over ``log B_noise`` (a dense grid, then a parabolic refinement),
vectorised so the bootstrap refits thousands of resamples quickly.

Shallue et al. 2018 ("Measuring the Effects of Data Parallelism on Neural Network Training")
describe three regimes of the steps-to-target curve: perfect scaling (doubling B halves S),
diminishing returns, and maximal data parallelism (S no longer falls). We mark them from the
fitted curve's local slope ``d log S / d log B = −B_noise/(B + B_noise)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "CriticalBatchFit",
    "fit_critical_batch",
    "bootstrap_critical_batch",
    "steps_model",
    "samples_model",
    "regime",
    "regime_bounds",
    "undetermined_reason",
    "REGIME_SLOPE",
]

#: Perfect scaling while the fitted slope is steeper than −(1 − REGIME_SLOPE), i.e. B ≤ B_noise/4
#: (each doubling still saves ≥ 43% of the steps); maximal data parallelism once it is flatter
#: than −REGIME_SLOPE, i.e. B ≥ 4·B_noise (steps within 25% of S_min).
REGIME_SLOPE = 0.2

# Search range of log B_noise around the measured batch sizes (factor 10^4 either side): wide
# enough that a curve with no visible bend is reported as "at the edge", not silently clipped.
_SPAN = math.log(1e4)
_GRID = 512


@dataclass(frozen=True, slots=True)
class CriticalBatchFit:
    """A fit of ``S(B) = S_min(1 + B_noise/B)`` (McCandlish et al. 2018, eq. 2.11)."""

    s_min: float
    """Minimum number of optimizer steps to reach the target (B → ∞)."""
    e_min: float
    """Minimum number of examples to reach the target (B → 0); ``S_min · B_noise``."""
    b_noise: float
    """The fitted noise scale ``B_noise``; equal to ``B_crit`` in this model."""
    rmse_log: float
    """Root-mean-square residual of ``log S`` (0.1 ≈ 10% scatter)."""
    at_edge: bool
    """True when ``B_noise`` hit the edge of the search range (the data show no bend)."""

    @property
    def b_crit(self) -> float:
        """Critical batch size ``B_crit = E_min / S_min``."""
        return self.e_min / self.s_min


def steps_model(b: np.ndarray | float, s_min: float, b_noise: float) -> np.ndarray:
    """``S(B) = S_min (1 + B_noise / B)``."""
    return s_min * (1.0 + b_noise / np.asarray(b, dtype=np.float64))


def samples_model(b: np.ndarray | float, e_min: float, b_noise: float) -> np.ndarray:
    """``E(B) = E_min (1 + B / B_noise)``."""
    return e_min * (1.0 + np.asarray(b, dtype=np.float64) / b_noise)


def _validate(batch_sizes: Sequence[float], steps: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(batch_sizes, dtype=np.float64).reshape(-1)
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    if b.shape != s.shape:
        raise ValueError(f"batch_sizes and steps must have the same length, got {b.size} and {s.size}")
    if not (np.all(np.isfinite(b)) and np.all(b > 0)):
        raise ValueError("batch_sizes must be finite and > 0")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError("steps must be finite and > 0")
    if np.unique(b).size < 2:
        raise ValueError(f"the fit needs at least 2 distinct batch sizes, got {np.unique(b).size}")
    return b, s


def _fit_many(log_b: np.ndarray, log_s: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit each row of ``(R, n)`` arrays; returns log S_min, log B_noise, sse, at_edge per row."""
    grid = np.linspace(lo, hi, _GRID)  # candidate log B_noise
    # f[g, i] = log(1 + B_noise_g / B_i), computed stably as logaddexp(0, lbn - lb)
    f = np.logaddexp(0.0, grid[:, None] - log_b[..., None, :])  # (R, G, n)
    resid = log_s[..., None, :] - f
    c = resid.mean(-1, keepdims=True)  # best log S_min for each candidate
    sse = ((resid - c) ** 2).sum(-1)  # (R, G)
    k = sse.argmin(-1)
    at_edge = (k == 0) | (k == _GRID - 1)
    # Parabolic refinement through the three grid points around the minimum.
    kk = np.clip(k, 1, _GRID - 2)
    rows = np.arange(sse.shape[0])
    y0, y1, y2 = sse[rows, kk - 1], sse[rows, kk], sse[rows, kk + 1]
    den = y0 - 2 * y1 + y2
    step = grid[1] - grid[0]
    shift = np.where(den > 0, 0.5 * (y0 - y2) / np.where(den > 0, den, 1.0), 0.0)
    lbn = np.where(at_edge, grid[k], grid[kk] + np.clip(shift, -1, 1) * step)
    f_best = np.logaddexp(0.0, lbn[:, None] - log_b)
    r = log_s - f_best
    c_best = r.mean(-1)
    sse_best = ((r - c_best[:, None]) ** 2).sum(-1)
    return c_best, lbn, sse_best, at_edge


def fit_critical_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> CriticalBatchFit:
    """Least-squares fit of ``log S = log S_min + log(1 + B_noise/B)`` to measured points.

    ``batch_sizes`` and ``steps`` are parallel sequences (several seeds per batch size are
    several points). Needs at least two distinct batch sizes; with fewer than three the
    fit is exact and says nothing about the shape.
    """
    b, s = _validate(batch_sizes, steps)
    lb, ls = np.log(b), np.log(s)
    lo, hi = lb.min() - _SPAN, lb.max() + _SPAN
    c, lbn, sse, edge = _fit_many(lb[None], ls[None], lo, hi)
    s_min, b_noise = float(np.exp(c[0])), float(np.exp(lbn[0]))
    return CriticalBatchFit(
        s_min=s_min, e_min=s_min * b_noise, b_noise=b_noise, rmse_log=float(math.sqrt(sse[0] / b.size)), at_edge=bool(edge[0])
    )


def bootstrap_critical_batch(
    batch_sizes: Sequence[float],
    steps: Sequence[float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``B_crit`` (Efron & Tibshirani 1993, ch. 13).

    When some batch size has several measurements (seeds), the seeds are resampled within
    each batch size (a stratified bootstrap: the design — which batch sizes were run — is
    fixed, the run-to-run noise is resampled). With one measurement per batch size, the
    cells themselves are resampled, and resamples with fewer than three distinct batch
    sizes (where the curve's shape is not identified) are redrawn. ``None`` when fewer than
    three distinct batch sizes exist.
    """
    b, s = _validate(batch_sizes, steps)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10, got {resamples}")
    uniq = np.unique(b)
    if uniq.size < 3:
        return None
    rng = np.random.default_rng(seed)
    n = b.size
    groups = [np.flatnonzero(b == u) for u in uniq]
    if any(g.size > 1 for g in groups):
        idx = np.concatenate([g[rng.integers(0, g.size, size=(resamples, g.size))] for g in groups], axis=1)
    else:
        idx = rng.integers(0, n, size=(resamples * 3, n))
        ok = np.array([np.unique(b[row]).size >= 3 for row in idx])
        idx = idx[ok][:resamples]
    lb, ls = np.log(b), np.log(s)
    lo, hi = lb.min() - _SPAN, lb.max() + _SPAN
    out = []
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):  # bounds memory: (R, G, n) floats
        _, lbn, _, _ = _fit_many(lb[chunk], ls[chunk], lo, hi)
        out.append(lbn)
    b_crit = np.exp(np.concatenate(out))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(b_crit, [alpha, 1 - alpha])
    return float(low), float(high)


def undetermined_reason(
    batch_sizes: Sequence[float],
    fit: CriticalBatchFit | None,
    interval: tuple[float, float] | None,
) -> str | None:
    """Why the measurements do not determine ``B_crit``, or ``None`` when they do.

    ``batch_sizes``: the batch size of every point fitted (one per seed); ``fit`` and
    ``interval``: what ``fit_critical_batch`` and ``bootstrap_critical_batch`` gave for them.

    A number is only reported when the data pin it down. Not determined:

    * fewer than 3 distinct batch sizes (a two-parameter curve through two points says nothing
      about its bend);
    * exactly 3 batch sizes with one measurement each: the fit has one residual degree of
      freedom, and the bootstrap (which keeps three distinct batch sizes) can only redraw the
      same three cells — its interval would have zero width by construction;
    * the fit at the edge of its search range (no bend in the measured curve);
    * ``S_min`` below one optimizer step (the curve falls as 1/B throughout, so the fit
      pushes ``B_noise`` up and ``S_min`` to nothing);
    * ``B_crit`` outside the measured batch sizes (an extrapolation);
    * a bootstrap interval of zero width: every resample gave the same value, so the
      measurements do not vary enough to bound it (typically steps-to-target quantised by the
      evaluation interval, or seeds that agree exactly).
    """
    b = np.asarray(batch_sizes, dtype=np.float64).reshape(-1)
    uniq = np.unique(b)
    if uniq.size < 3:
        return f"needs at least 3 batch sizes that reached the target; {uniq.size} did"
    if uniq.size == 3 and b.size == 3:
        return ("too few distinct points: 3 batch sizes with one seed each fix the fit's two parameters with "
                "one point to spare and leave the bootstrap nothing to resample (add batch sizes or seeds)")
    if fit is None:
        return "no fit"
    lo_b, hi_b = float(uniq[0]), float(uniq[-1])
    if fit.at_edge:
        return ("the measured steps show no bend (the fit runs to the edge of its search range): "
                "extend --batch-sizes past the saturation, or below it")
    if not fit.s_min >= 1.0:
        return f"S_min = {fit.s_min:.3g} is below one optimizer step: the steps fall as 1/B throughout, no saturation was measured"
    if not lo_b <= fit.b_crit <= hi_b:
        return (f"the fit puts B_crit at {fit.b_crit:.4g}, outside the measured batch sizes "
                f"{lo_b:g}–{hi_b:g}: an extrapolation, not a measurement")
    if interval is not None and not interval[1] > interval[0] * (1 + 1e-9):
        return (f"the bootstrap interval has zero width (every resample gave {interval[0]:.4g}): the measurements "
                f"do not vary enough to bound B_crit (steps to target quantised by the evaluation interval, or "
                f"seeds that agree exactly)")
    return None


def regime_bounds(b_noise: float) -> tuple[float, float]:
    """Batch sizes where the fitted curve leaves perfect scaling and enters maximal data parallelism.

    Local slope ``−B_noise/(B + B_noise)``: steeper than ``−(1 − REGIME_SLOPE)`` below the
    first bound, flatter than ``−REGIME_SLOPE`` above the second.
    """
    r = REGIME_SLOPE
    return b_noise * r / (1 - r), b_noise * (1 - r) / r


def regime(batch_size: float, b_noise: float) -> str:
    """Shallue et al.'s regime of ``batch_size``: perfect scaling, diminishing returns or maximal parallelism."""
    lo, hi = regime_bounds(b_noise)
    if batch_size <= lo:
        return "perfect scaling"
    if batch_size >= hi:
        return "maximal data parallelism"
    return "diminishing returns"

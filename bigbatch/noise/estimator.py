"""The simple gradient noise scale ``B_simple = tr(Σ)/|G|²`` from two batch sizes.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
Appendix A.1. For a gradient estimate ``G_b`` averaged over ``b`` i.i.d. examples,
``E|G_b|² = |G|² + tr(Σ)/b`` (Σ: per-example gradient covariance). Two batch sizes
``b < B`` give two equations in the two unknowns, hence the unbiased estimates::

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

and ``B_simple = tr(Σ)/|G|²`` (their Eq. 2.8 approximates B_noise, hence the critical batch).
A ratio of two noisy estimates is biased, so, as the paper does, numerator and denominator
are smoothed by *separate* exponential moving averages and divided only when read.

How far to trust the smoothed ratio: the same EMA weights also average the squares and the
product of the two single estimates, which gives their weighted spread; the standard error of a
weighted mean is that spread over ``n_eff − 1`` (``n_eff = (Σw)²/Σw²``, the effective number of
readings), and the delta method carries it to the ratio: ``b_simple_rse``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from bigbatch._checks import check_in_range, check_positive

__all__ = ["NoiseScale", "unbiased_estimates", "ema_effective_n"]


def ema_effective_n(beta: float, n: int) -> float:
    """Kish's effective sample size ``(Σw)²/Σw²`` of an EMA with factor ``beta`` after ``n`` readings.

    The weights are ``beta^(n-i)``: 1 for one reading, ``(1+beta)/(1-beta)`` in the limit.
    """
    if n <= 0:
        return 0.0
    if beta == 0.0:
        return 1.0
    return (1.0 - beta**n) ** 2 * (1.0 + beta) / ((1.0 - beta) * (1.0 - beta ** (2 * n)))


def unbiased_estimates(small_sqnorm: float, big_sqnorm: float, b_small: float, b_big: float) -> tuple[float, float]:
    """``(|G|², tr Σ)`` from ``|G_b|²`` at ``b_small`` and ``|G_B|²`` at ``b_big`` (App. A.1).

    Either value may be negative for one pair of readings; both are unbiased.
    """
    g2 = (b_big * big_sqnorm - b_small * small_sqnorm) / (b_big - b_small)
    tr = (small_sqnorm - big_sqnorm) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


class NoiseScale:
    """Running estimate of ``|G|²``, ``tr(Σ)`` and ``B_simple`` fed with squared gradient norms.

    ``update(small_sqnorm, big_sqnorm, b_small, b_big)`` takes the (mean) squared norm of
    gradients averaged over ``b_small`` examples and the squared norm of the gradient averaged
    over ``b_big`` examples. Batch sizes are in whatever unit the loss is averaged over
    (examples or tokens) and may be fractional (a harmonic mean of unequal micro-batches).

    The EMAs are debiased like Adam's moments (divided by ``1 − beta^n``), so ``grad_sqnorm``
    and ``trace_sigma`` are usable from the first update; the debiasing cancels in the ratio.
    A non-finite reading is skipped and counted in ``n_skipped``, never folded into the state.
    ``b_simple_rse`` is the relative standard error of ``b_simple`` (see the module docstring):
    infinite until two readings, small once many agree.
    """

    def __init__(self, beta: float = 0.99) -> None:
        self.beta = check_in_range("beta", beta, 0.0, 1.0)
        self.reset()

    def reset(self) -> None:
        self._ema_g2 = 0.0
        self._ema_tr = 0.0
        self._beta_pow = 1.0  # beta ** n_updates, for debiasing
        # EMAs of g2², tr², g2·tr (same weights as the means): the spread of the single readings.
        self._ema_g2g2 = self._ema_trtr = self._ema_g2tr = 0.0
        self.n_updates = 0
        self.n_skipped = 0
        self.last_grad_sqnorm = math.nan
        self.last_trace_sigma = math.nan

    def update(self, small_sqnorm: float, big_sqnorm: float, b_small: float, b_big: float) -> bool:
        """Fold in one pair of readings; False (and ``n_skipped += 1``) if a norm is not finite."""
        b_small = check_positive("b_small", b_small)
        b_big = check_positive("b_big", b_big)
        if not b_big > b_small:
            raise ValueError(f"b_big must be > b_small, got b_small={b_small}, b_big={b_big}")
        small, big = float(small_sqnorm), float(big_sqnorm)
        if not (math.isfinite(small) and math.isfinite(big)):
            self.n_skipped += 1
            return False
        if small < 0 or big < 0:
            raise ValueError(f"squared norms must be >= 0, got small_sqnorm={small}, big_sqnorm={big}")
        g2, tr = unbiased_estimates(small, big, b_small, b_big)
        if not (math.isfinite(g2) and math.isfinite(tr)):  # overflow in the combination
            self.n_skipped += 1
            return False
        # Negative single readings are kept: dropping them would bias both EMAs upward.
        self._ema_g2 = self.beta * self._ema_g2 + (1.0 - self.beta) * g2
        self._ema_tr = self.beta * self._ema_tr + (1.0 - self.beta) * tr
        self._ema_g2g2 = self.beta * self._ema_g2g2 + (1.0 - self.beta) * g2 * g2
        self._ema_trtr = self.beta * self._ema_trtr + (1.0 - self.beta) * tr * tr
        self._ema_g2tr = self.beta * self._ema_g2tr + (1.0 - self.beta) * g2 * tr
        self._beta_pow *= self.beta
        self.n_updates += 1
        self.last_grad_sqnorm, self.last_trace_sigma = g2, tr
        return True

    def _debias(self, v: float) -> float:
        return v / (1.0 - self._beta_pow) if self.n_updates else math.nan

    @property
    def grad_sqnorm(self) -> float:
        """EMA of the unbiased ``|G|²`` estimates (nan before the first update)."""
        return self._debias(self._ema_g2)

    @property
    def trace_sigma(self) -> float:
        """EMA of the unbiased ``tr(Σ)`` estimates (nan before the first update)."""
        return self._debias(self._ema_tr)

    @property
    def b_simple(self) -> float:
        """``tr(Σ)/|G|²`` from the two EMAs; nan until the EMA of ``|G|²`` is positive."""
        if self.n_updates == 0 or not self._ema_g2 > 0:
            return math.nan
        return self._ema_tr / self._ema_g2

    @property
    def n_effective(self) -> float:
        """Effective number of readings in the EMAs (:func:`ema_effective_n`)."""
        return ema_effective_n(self.beta, self.n_updates)

    @property
    def b_simple_rse(self) -> float:
        """Relative standard error of ``b_simple``: inf with fewer than two readings or no valid ratio.

        Delta method on ``T/G`` (``T``, ``G``: the EMAs of tr(Σ) and |G|²), with each EMA's
        standard error ``s/√(n_eff − 1)`` from the weighted spread ``s`` of the single readings
        (``n_eff − 1``: the weighted analogue of Bessel's correction). It treats the readings as
        independent; consecutive steps are correlated, so it is a lower bound on the true error.
        """
        n_eff = self.n_effective
        g, t = self.grad_sqnorm, self.trace_sigma
        if not (n_eff > 1.0 + 1e-12 and g > 0 and t > 0):
            return math.inf
        d = 1.0 - self._beta_pow
        var_g = max(self._ema_g2g2 / d - g * g, 0.0)
        var_t = max(self._ema_trtr / d - t * t, 0.0)
        cov = self._ema_g2tr / d - g * t
        rel2 = (var_t / (t * t) + var_g / (g * g) - 2.0 * cov / (g * t)) / (n_eff - 1.0)
        return math.sqrt(max(rel2, 0.0))

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "ema_g2": self._ema_g2,
            "ema_tr": self._ema_tr,
            "beta_pow": self._beta_pow,
            "n_updates": self.n_updates,
            "n_skipped": self.n_skipped,
            "ema_g2g2": self._ema_g2g2,
            "ema_trtr": self._ema_trtr,
            "ema_g2tr": self._ema_g2tr,
            "last_grad_sqnorm": self.last_grad_sqnorm,
            "last_trace_sigma": self.last_trace_sigma,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        beta = check_in_range("beta", state["beta"], 0.0, 1.0)
        ema_g2, ema_tr, beta_pow = float(state["ema_g2"]), float(state["ema_tr"]), float(state["beta_pow"])
        if not all(math.isfinite(v) for v in (ema_g2, ema_tr, beta_pow)):
            raise ValueError("NoiseScale state has non-finite EMAs")
        self.beta, self._ema_g2, self._ema_tr, self._beta_pow = beta, ema_g2, ema_tr, beta_pow
        self.n_updates, self.n_skipped = int(state["n_updates"]), int(state["n_skipped"])
        if "ema_g2g2" in state:
            second = [float(state[k]) for k in ("ema_g2g2", "ema_trtr", "ema_g2tr")]
            if not all(math.isfinite(v) for v in second):
                raise ValueError("NoiseScale state has non-finite EMAs")
        else:  # a state saved before the spread was kept: no spread known, as if each reading were the mean
            d = 1.0 - beta_pow
            second = [ema_g2 * ema_g2 / d, ema_tr * ema_tr / d, ema_g2 * ema_tr / d] if self.n_updates else [0.0] * 3
        self._ema_g2g2, self._ema_trtr, self._ema_g2tr = second
        self.last_grad_sqnorm = float(state.get("last_grad_sqnorm", math.nan))
        self.last_trace_sigma = float(state.get("last_trace_sigma", math.nan))

    def __repr__(self) -> str:
        return f"NoiseScale(beta={self.beta}, n_updates={self.n_updates}, b_simple={self.b_simple:.4g})"

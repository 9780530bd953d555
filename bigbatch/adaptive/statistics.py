"""Controllers driven by the noise statistics: B_simple (McCandlish et al. 2018) and the norm test."""

from __future__ import annotations

from typing import Any, Unpack

from bigbatch._checks import check_positive
from bigbatch.adaptive.base import ControllerState, GrowthArgs, GrowthController, _valid

__all__ = ["NoiseScaleController", "NormTestController"]


class NoiseScaleController(GrowthController):
    """Batch ≈ c·B_simple: follow the critical batch as it grows (McCandlish et al. 2018).

    McCandlish et al. (§2.2, eq. 2.8 and §2.3) show that B_crit ≈ B_noise ≈ B_simple = tr(Σ)/|G|²:
    training at B ≪ B_crit wastes optimizer steps, at B ≫ B_crit wastes samples. The controller
    grows the batch when c·B_simple ≥ ``growth``·B (or reaches ``max_batch`` when that is nearer),
    to c·B_simple rounded *down* to a multiple of ``granularity`` but at least ×``growth``.

    Args:
        c: target multiple of B_simple (> 0). McCandlish's B_crit ≈ B_simple gives c = 1.
        **growth_args: :class:`GrowthController`'s arguments (bounds, ``growth``, ``min_interval``,
            ``granularity``, ``patience``, ``start_samples``, and the settled check's
            ``min_readings`` and ``max_rse``; listed in :class:`~bigbatch.adaptive.base.GrowthArgs`).
    """

    name = "noise"

    def __init__(self, *, c: float = 1.0, **growth_args: Unpack[GrowthArgs]) -> None:
        super().__init__(**growth_args)
        self.c = float(check_positive("c", c))

    def config(self) -> dict[str, Any]:
        return {"c": self.c, **super().config()}

    def _requested(self, state: ControllerState) -> tuple[float, str] | None:
        bs = state.b_simple
        if not _valid(bs) or bs <= 0:
            return None
        target = self.c * bs
        return target, f"c·B_simple = {self.c:g}×{bs:.4g} = {target:.4g}"

    def _wants_growth(self, requested: float, batch: int) -> bool:
        threshold = self._cap(self._ceil(self.growth * batch))
        return requested >= threshold

    def _round(self, requested: float) -> int:
        # Down: the target is where extra samples start to be wasted; don't overshoot it.
        return self._floor(requested)


class NormTestController(GrowthController):
    """The norm test (Byrd, Chin, Nocedal & Wu 2012, §3; AdAdaGrad, Lau, Liu & Kolar 2024, §3).

    The test asks the mini-batch gradient g_B to point in a descent direction with high
    probability: E‖g_B − ∇F‖² ≤ η²‖∇F‖². With per-example covariance Σ the left side is tr(Σ)/B,
    so the test fails when tr(Σ)/B > η²·|G|², and the batch at which it holds again is
    B = tr(Σ)/(η²·|G|²) = B_simple/η² — Byrd et al.'s sample-size update, computed here from the
    estimator's unbiased tr(Σ) and |G|² (the small/big-batch statistics of McCandlish App. A).
    With ``sample_norm=True`` the right side uses the expected squared norm of the batch gradient,
    E‖g_B‖² = |G|² + tr(Σ)/B, as Byrd et al.'s practical test does with ‖g_S‖².

    When the test fails the batch grows to the requested size rounded *up* to ``granularity`` (so
    the test holds there), and by at least ×``growth``; bounds, ``min_interval``, ``patience``,
    ``start_samples`` and the settled check as for :class:`NoiseScaleController`.

    Args:
        eta: the test's tolerance η (> 0); smaller η asks for larger batches (η = 1: B_simple).
        sample_norm: use E‖g_B‖² instead of |G|² on the right side of the test.
        **growth_args: :class:`GrowthController`'s arguments (see :class:`NoiseScaleController`).
    """

    name = "normtest"

    def __init__(self, *, eta: float = 1.0, sample_norm: bool = False, **growth_args: Unpack[GrowthArgs]) -> None:
        super().__init__(**growth_args)
        self.eta = float(check_positive("eta", eta))
        if not isinstance(sample_norm, bool):
            raise ValueError(f"sample_norm must be true or false, got {sample_norm!r}")
        self.sample_norm = sample_norm

    def config(self) -> dict[str, Any]:
        return {"eta": self.eta, "sample_norm": self.sample_norm, **super().config()}

    def _requested(self, state: ControllerState) -> tuple[float, str] | None:
        g2, tr = state.grad_sqnorm, state.trace_sigma
        if not (_valid(g2) and _valid(tr)) or g2 <= 0:
            return None
        tr = max(tr, 0.0)  # a negative variance estimate means "no measurable noise": the test holds
        b = state.batch_size
        rhs = g2 + tr / b if self.sample_norm else g2
        requested = tr / (self.eta**2 * rhs)
        why = f"norm test failed: tr(Σ)/B = {tr / b:.4g} > η²·{'E‖g_B‖²' if self.sample_norm else '|G|²'} = {self.eta**2 * rhs:.4g}"
        return requested, why

    def _wants_growth(self, requested: float, batch: int) -> bool:
        # tr(Σ)/B > η²·rhs  ⟺  B < tr(Σ)/(η²·rhs) = requested (rhs > 0).
        return requested > batch

    def _round(self, requested: float) -> int:
        return self._ceil(requested)

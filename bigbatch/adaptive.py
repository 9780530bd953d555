"""Adaptive batch size: controllers that say how large the next global batch should be.

The critical batch size grows during training (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", §2.2 and Fig. 5), so a fixed batch is too large early and too small late.
A controller is fed a :class:`ControllerState` — samples seen, the current global batch, the step
and the noise-scale readings of ``bigbatch.noise`` — and returns the next global batch size:

- :class:`NoiseScaleController`: batch ≈ c·B_simple, B_simple = tr(Σ)/|G|² (McCandlish eq. 2.8
  and §2.3), growth only, in steps of at least ×``growth`` with a dead band (hysteresis).
- :class:`NormTestController`: the norm test of Byrd, Chin, Nocedal & Wu 2012 ("Sample size
  selection in optimization methods for machine learning", §3) as used by AdAdaGrad (Lau, Liu &
  Kolar 2024, §3): grow when the variance of the mean gradient tr(Σ)/B exceeds η²·|G|², to the
  batch at which the test holds, B = tr(Σ)/(η²·|G|²).
- :class:`RampController`: Megatron-LM's linear ramp of the batch from a start to an end size over
  a number of samples, in fixed increments (``--rampup-batch-size start increment samples``).

Every decision is *realisable*: a multiple of ``granularity`` (micro-batch × world size, so the
trainer realises it with an integer number of accumulation steps) within [min_batch, max_batch].
Readings that are missing, NaN, infinite or not positive (early in training the unbiased
estimates of McCandlish eq. A.1 are often negative) are ignored: the controller does not act.
Time is counted in samples (DESIGN.md §2), so ``min_interval`` and ramps are in samples.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from bigbatch._checks import check_choice, check_int_positive, check_positive

__all__ = [
    "ControllerState",
    "BatchSizeChange",
    "BatchSizeController",
    "NoiseScaleController",
    "NormTestController",
    "RampController",
    "CONTROLLERS",
    "create_controller",
]


def _check_int_nonnegative(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _reading(name: str, value: Any) -> float | None:
    """A noise-scale reading as a float; None stays None, NaN/inf are kept (and later ignored)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or None, got {value!r}") from None


def _valid(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclass(slots=True)
class ControllerState:
    """What a controller sees after an optimizer step.

    ``b_simple``, ``grad_sqnorm`` (|G|²) and ``trace_sigma`` (tr Σ) are the smoothed readings of the
    noise-scale estimator (``bigbatch.noise.NoiseScale``); any of them may be None or NaN early.
    """

    samples: int
    """Samples (examples or tokens) seen so far, summed over all steps."""
    batch_size: int
    """The global batch size the last step used (what the trainer runs now)."""
    step: int = 0
    """Optimizer steps taken so far."""
    b_simple: float | None = None
    """Simple noise scale tr(Σ)/|G|² (McCandlish et al. 2018, eq. 2.8)."""
    grad_sqnorm: float | None = None
    """Estimate of |G|², the squared norm of the true gradient."""
    trace_sigma: float | None = None
    """Estimate of tr(Σ), the trace of the per-example gradient covariance."""

    def __post_init__(self) -> None:
        self.samples = _check_int_nonnegative("samples", self.samples)
        self.batch_size = check_int_positive("batch_size", self.batch_size)
        self.step = _check_int_nonnegative("step", self.step)
        self.b_simple = _reading("b_simple", self.b_simple)
        self.grad_sqnorm = _reading("grad_sqnorm", self.grad_sqnorm)
        self.trace_sigma = _reading("trace_sigma", self.trace_sigma)

    @classmethod
    def from_estimator(cls, estimator: Any, *, samples: int, batch_size: int, step: int = 0) -> "ControllerState":
        """Read ``b_simple``/``grad_sqnorm``/``trace_sigma`` from a noise estimator (or None: no readings)."""
        get = (lambda k: None) if estimator is None else (lambda k: getattr(estimator, k, None))
        return cls(
            samples=samples,
            batch_size=batch_size,
            step=step,
            b_simple=get("b_simple"),
            grad_sqnorm=get("grad_sqnorm"),
            trace_sigma=get("trace_sigma"),
        )


@dataclass(frozen=True, slots=True)
class BatchSizeChange:
    """One decision that changed the batch: for the metrics log and the noise plot."""

    step: int
    samples: int
    old: int
    new: int
    reason: str


class BatchSizeController(ABC):
    """The interface: ``next_batch_size(state) -> int`` plus ``state_dict``/``load_state_dict``.

    Call ``next_batch_size`` once after every optimizer step (and once before the first step, with
    ``samples=0``, to get the starting batch). The returned batch is a multiple of ``granularity``.
    ``changes`` lists every decision that changed the batch.
    """

    name: str = ""

    def __init__(self, *, granularity: int = 1) -> None:
        self.granularity = check_int_positive("granularity", granularity)
        self.changes: list[BatchSizeChange] = []

    @abstractmethod
    def next_batch_size(self, state: ControllerState) -> int:
        """The global batch size for the next optimizer step."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments (informational; ``load_state_dict`` does not restore them)."""
        return {"granularity": self.granularity}

    def _runtime_state(self) -> dict[str, Any]:
        return {}

    def _load_runtime_state(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config(),
            "changes": [asdict(c) for c in self.changes],
            **self._runtime_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for controller {state.get('name')!r}, not {self.name!r}")
        self._load_runtime_state(state)
        self.changes = [BatchSizeChange(**c) for c in state.get("changes", [])]

    def _check_current(self, state: ControllerState) -> int:
        b = state.batch_size
        if b % self.granularity:
            raise ValueError(
                f"state.batch_size {b} is not a multiple of granularity {self.granularity} "
                "(micro-batch × world size); the trainer cannot realise it"
            )
        return b

    def _change(self, state: ControllerState, new: int, reason: str) -> int:
        if new != state.batch_size:
            self.changes.append(BatchSizeChange(state.step, state.samples, state.batch_size, new, reason))
        return new

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class _GrowthController(BatchSizeController):
    """Shared rules of the two statistics-driven controllers.

    Growth only, within [min_batch, max_batch], in steps of at least ×``growth``, at most once per
    ``min_interval`` samples, only after ``patience`` consecutive readings asked for it, and never
    before ``start_samples``. The growth minimum is what prevents oscillation: after a change the
    batch has moved past the noisy target, so a reading must move by a whole factor ``growth``
    again before the next change (a Schmitt-trigger dead band).
    """

    def __init__(
        self,
        *,
        min_batch: int | None = None,
        max_batch: int | None = None,
        growth: float = 2.0,
        min_interval: int = 0,
        granularity: int = 1,
        patience: int = 1,
        start_samples: int = 0,
    ) -> None:
        super().__init__(granularity=granularity)
        g = self.granularity
        self.min_batch = g if min_batch is None else check_int_positive("min_batch", min_batch)
        self.max_batch = None if max_batch is None else check_int_positive("max_batch", max_batch)
        if self.min_batch % g:
            raise ValueError(f"min_batch must be a multiple of granularity {g}, got {self.min_batch}")
        if self.max_batch is not None:
            if self.max_batch % g:
                raise ValueError(f"max_batch must be a multiple of granularity {g}, got {self.max_batch}")
            if self.max_batch < self.min_batch:
                raise ValueError(f"max_batch must be >= min_batch {self.min_batch}, got {self.max_batch}")
        try:
            self.growth = float(growth)
        except (TypeError, ValueError):
            raise ValueError(f"growth must be a number > 1, got {growth!r}") from None
        if not (self.growth > 1.0 and math.isfinite(self.growth)):
            raise ValueError(f"growth must be > 1 and finite, got {growth!r}")
        self.min_interval = _check_int_nonnegative("min_interval", min_interval)
        self.patience = check_int_positive("patience", patience)
        self.start_samples = _check_int_nonnegative("start_samples", start_samples)
        # Samples at the last change; the clock starts when the controller first sees the run.
        self._last_change: int | None = None
        self._streak = 0

    def config(self) -> dict[str, Any]:
        return {
            "min_batch": self.min_batch,
            "max_batch": self.max_batch,
            "growth": self.growth,
            "min_interval": self.min_interval,
            "granularity": self.granularity,
            "patience": self.patience,
            "start_samples": self.start_samples,
        }

    def _runtime_state(self) -> dict[str, Any]:
        return {"last_change": self._last_change, "streak": self._streak}

    def _load_runtime_state(self, state: Mapping[str, Any]) -> None:
        last = state.get("last_change")
        self._last_change = None if last is None else _check_int_nonnegative("last_change", last)
        self._streak = _check_int_nonnegative("streak", state.get("streak", 0))

    def _ceil(self, x: float) -> int:
        g = self.granularity
        return int(math.ceil(x / g - 1e-9)) * g

    def _floor(self, x: float) -> int:
        g = self.granularity
        return int(math.floor(x / g + 1e-9)) * g

    def _cap(self, b: int) -> int:
        return b if self.max_batch is None else min(b, self.max_batch)

    @abstractmethod
    def _requested(self, state: ControllerState) -> tuple[float, str] | None:
        """The batch the statistics ask for, and how it was derived; None when they can't say."""

    @abstractmethod
    def _wants_growth(self, requested: float, batch: int) -> bool:
        """Whether a (valid) request triggers growth from ``batch``."""

    @abstractmethod
    def _round(self, requested: float) -> int:
        """A requested batch as a multiple of ``granularity``."""

    def next_batch_size(self, state: ControllerState) -> int:
        b = self._check_current(state)
        if self._last_change is None:
            self._last_change = state.samples
        # The bounds are hard constraints, enforced even without readings.
        if b < self.min_batch:
            self._last_change = state.samples
            return self._change(state, self.min_batch, f"batch {b} below min_batch {self.min_batch}")
        if self.max_batch is not None and b > self.max_batch:
            self._last_change = state.samples
            return self._change(state, self.max_batch, f"batch {b} above max_batch {self.max_batch}")
        if state.samples < self.start_samples:
            return b
        req = self._requested(state)
        if req is None:  # no usable reading: neither counts towards patience nor resets it
            return b
        requested, why = req
        if not self._wants_growth(requested, b):
            self._streak = 0
            return b
        self._streak += 1
        if self._streak < self.patience or state.samples - self._last_change < self.min_interval:
            return b
        new = self._cap(max(self._round(requested), self._ceil(self.growth * b)))
        if new <= b:  # already at max_batch
            return b
        self._streak = 0
        self._last_change = state.samples
        return self._change(state, new, why)


class NoiseScaleController(_GrowthController):
    """Batch ≈ c·B_simple: follow the critical batch as it grows (McCandlish et al. 2018).

    McCandlish et al. (§2.2, eq. 2.8 and §2.3) show that B_crit ≈ B_noise ≈ B_simple = tr(Σ)/|G|²:
    training at B ≪ B_crit wastes optimizer steps, at B ≫ B_crit wastes samples. The controller
    grows the batch when c·B_simple ≥ ``growth``·B (or reaches ``max_batch`` when that is nearer),
    to c·B_simple rounded *down* to a multiple of ``granularity`` but at least ×``growth``.

    Args:
        c: target multiple of B_simple (> 0). McCandlish's B_crit ≈ B_simple gives c = 1.
        min_batch, max_batch: bounds (multiples of ``granularity``); max None = unbounded.
        growth: smallest factor of a change (> 1); also the width of the hysteresis band.
        min_interval: samples that must pass between two changes (≥ 0).
        granularity: micro-batch × world size; every batch is a multiple of it.
        patience: consecutive readings that must ask for growth before it happens (≥ 1).
        start_samples: no decision before this many samples (the estimator's warm-up).
    """

    name = "noise"

    def __init__(
        self,
        *,
        c: float = 1.0,
        min_batch: int | None = None,
        max_batch: int | None = None,
        growth: float = 2.0,
        min_interval: int = 0,
        granularity: int = 1,
        patience: int = 1,
        start_samples: int = 0,
    ) -> None:
        super().__init__(
            min_batch=min_batch,
            max_batch=max_batch,
            growth=growth,
            min_interval=min_interval,
            granularity=granularity,
            patience=patience,
            start_samples=start_samples,
        )
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


class NormTestController(_GrowthController):
    """The norm test (Byrd, Chin, Nocedal & Wu 2012, §3; AdAdaGrad, Lau, Liu & Kolar 2024, §3).

    The test asks the mini-batch gradient g_B to point in a descent direction with high
    probability: E‖g_B − ∇F‖² ≤ η²‖∇F‖². With per-example covariance Σ the left side is tr(Σ)/B,
    so the test fails when tr(Σ)/B > η²·|G|², and the batch at which it holds again is
    B = tr(Σ)/(η²·|G|²) = B_simple/η² — Byrd et al.'s sample-size update, computed here from the
    estimator's unbiased tr(Σ) and |G|² (the small/big-batch statistics of McCandlish App. A).
    With ``sample_norm=True`` the right side uses the expected squared norm of the batch gradient,
    E‖g_B‖² = |G|² + tr(Σ)/B, as Byrd et al.'s practical test does with ‖g_S‖².

    When the test fails the batch grows to the requested size rounded *up* to ``granularity`` (so
    the test holds there), and by at least ×``growth``; bounds, ``min_interval``, ``patience`` and
    ``start_samples`` as for :class:`NoiseScaleController`.

    Args:
        eta: the test's tolerance η (> 0); smaller η asks for larger batches (η = 1: B_simple).
        sample_norm: use E‖g_B‖² instead of |G|² on the right side of the test.
    """

    name = "normtest"

    def __init__(
        self,
        *,
        eta: float = 1.0,
        sample_norm: bool = False,
        min_batch: int | None = None,
        max_batch: int | None = None,
        growth: float = 2.0,
        min_interval: int = 0,
        granularity: int = 1,
        patience: int = 1,
        start_samples: int = 0,
    ) -> None:
        super().__init__(
            min_batch=min_batch,
            max_batch=max_batch,
            growth=growth,
            min_interval=min_interval,
            granularity=granularity,
            patience=patience,
            start_samples=start_samples,
        )
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


class RampController(BatchSizeController):
    """Megatron-LM's batch-size ramp: linear in samples, in steps of ``increment``.

    With n = (end_batch − start_batch)/increment increments spread evenly over ``ramp_samples``,
    the batch after s samples is start_batch + ⌊s·n/ramp_samples⌋·increment, and end_batch from
    ``ramp_samples`` on (Megatron's ``RampupBatchsizeNumMicroBatches``, computed in exact integer
    arithmetic rather than floats). The readings are not used.

    Args:
        start_batch, end_batch: the ramp's ends (multiples of ``granularity``, end ≥ start).
        ramp_samples: samples over which the batch ramps (> 0).
        increment: batch increment (a multiple of ``granularity`` dividing end − start);
            default ``granularity``.
        granularity: micro-batch × world size.
    """

    name = "ramp"

    def __init__(
        self,
        *,
        start_batch: int,
        end_batch: int,
        ramp_samples: int,
        increment: int | None = None,
        granularity: int = 1,
    ) -> None:
        super().__init__(granularity=granularity)
        g = self.granularity
        self.start_batch = check_int_positive("start_batch", start_batch)
        self.end_batch = check_int_positive("end_batch", end_batch)
        self.ramp_samples = check_int_positive("ramp_samples", ramp_samples)
        self.increment = g if increment is None else check_int_positive("increment", increment)
        for k in ("start_batch", "end_batch", "increment"):
            if getattr(self, k) % g:
                raise ValueError(f"{k} must be a multiple of granularity {g}, got {getattr(self, k)}")
        if self.end_batch < self.start_batch:
            raise ValueError(f"end_batch must be >= start_batch {self.start_batch}, got {self.end_batch}")
        span = self.end_batch - self.start_batch
        if span % self.increment:
            raise ValueError(
                f"increment must divide end_batch - start_batch = {span}, got {self.increment}"
            )
        self.num_increments = span // self.increment

    def config(self) -> dict[str, Any]:
        return {
            "start_batch": self.start_batch,
            "end_batch": self.end_batch,
            "ramp_samples": self.ramp_samples,
            "increment": self.increment,
            "granularity": self.granularity,
        }

    def batch_size_at(self, samples: int) -> int:
        """The ramp's batch after ``samples`` samples (a pure function)."""
        samples = _check_int_nonnegative("samples", samples)
        if samples >= self.ramp_samples:
            return self.end_batch
        return self.start_batch + (samples * self.num_increments // self.ramp_samples) * self.increment

    def next_batch_size(self, state: ControllerState) -> int:
        self._check_current(state)
        new = self.batch_size_at(state.samples)
        return self._change(state, new, f"ramp: {state.samples}/{self.ramp_samples} samples")


CONTROLLERS: dict[str, type[BatchSizeController]] = {
    NoiseScaleController.name: NoiseScaleController,
    NormTestController.name: NormTestController,
    RampController.name: RampController,
}


def create_controller(name: str, **kwargs: Any) -> BatchSizeController:
    """Build a controller by name (noise, normtest, ramp); unknown names or arguments raise ValueError."""
    cls = CONTROLLERS[check_choice("adaptive controller", name, CONTROLLERS)]
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for controller {name!r}; valid: {', '.join(valid)}")
    missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"controller {name!r} needs argument(s) {', '.join(missing)}")
    return cls(**kwargs)

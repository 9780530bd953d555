"""The controller interface, the state it is fed, and the rules shared by the growth controllers."""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Mapping, TypedDict

from bigbatch._checks import check_int_nonnegative, check_int_positive, check_positive

__all__ = ["ControllerState", "BatchSizeChange", "BatchSizeController", "GrowthController", "GrowthArgs"]


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
    n_readings: int | None = None
    """Readings folded into the estimator so far (``NoiseScale.n_updates``); None: not known."""
    b_simple_rse: float | None = None
    """Relative standard error of ``b_simple`` (``NoiseScale.b_simple_rse``); None: not known."""

    def __post_init__(self) -> None:
        self.samples = check_int_nonnegative("samples", self.samples)
        self.batch_size = check_int_positive("batch_size", self.batch_size)
        self.step = check_int_nonnegative("step", self.step)
        self.b_simple = _reading("b_simple", self.b_simple)
        self.grad_sqnorm = _reading("grad_sqnorm", self.grad_sqnorm)
        self.trace_sigma = _reading("trace_sigma", self.trace_sigma)
        if self.n_readings is not None:
            self.n_readings = check_int_nonnegative("n_readings", self.n_readings)
        self.b_simple_rse = _reading("b_simple_rse", self.b_simple_rse)

    @classmethod
    def from_estimator(cls, estimator: Any, *, samples: int, batch_size: int, step: int = 0,
                       units_per_sample: float | None = None) -> "ControllerState":
        """Read the readings off a noise estimator (``bigbatch.noise.NoiseScale``; None: no readings).

        ``units_per_sample``: loss units per example (tokens per sequence) when the estimator
        counts tokens; ``b_simple`` and ``tr(Σ)`` are then converted to examples, the unit of the
        batch size (both alike, so B_simple = tr(Σ)/|G|² still holds). NaN or None: no conversion.
        """
        get = (lambda k: None) if estimator is None else (lambda k: getattr(estimator, k, None))
        b, tr = get("b_simple"), get("trace_sigma")
        if units_per_sample is not None and math.isfinite(units_per_sample) and units_per_sample > 0:
            b = None if b is None else b / units_per_sample
            tr = None if tr is None else tr / units_per_sample
        return cls(
            samples=samples,
            batch_size=batch_size,
            step=step,
            b_simple=b,
            grad_sqnorm=get("grad_sqnorm"),
            trace_sigma=tr,
            n_readings=get("n_updates"),
            b_simple_rse=get("b_simple_rse"),
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
    needs_noise: bool = False
    """True when the controller decides from noise readings: the trainer must measure them."""

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


class GrowthArgs(TypedDict, total=False):
    """The keyword arguments every :class:`GrowthController` takes (see its docstring)."""

    min_batch: int | None
    max_batch: int | None
    growth: float
    min_interval: int
    granularity: int
    patience: int
    start_samples: int
    min_readings: int
    max_rse: float | None


class GrowthController(BatchSizeController):
    """Shared rules of the two statistics-driven controllers.

    Growth only, within [min_batch, max_batch], in steps of at least ×``growth``, at most once per
    ``min_interval`` samples, only after ``patience`` consecutive readings asked for it, never
    before ``start_samples``, and only on a *settled* estimate. The growth minimum is what prevents
    oscillation: after a change the batch has moved past the noisy target, so a reading must move
    by a whole factor ``growth`` again before the next change (a Schmitt-trigger dead band).

    Settled: at least ``min_readings`` readings were folded into the estimator since the last
    change of the batch (``state.n_readings``), and the relative standard error of its B_simple
    (``state.b_simple_rse``) is at most ``max_rse``. An unsettled reading is treated like a missing
    one: no decision, and it neither counts towards ``patience`` nor resets it. A state that does
    not carry ``n_readings`` (or ``b_simple_rse``) cannot be judged on it; that criterion is then
    skipped with a one-time warning (:meth:`ControllerState.from_estimator` fills both).

    Args (keyword only; subclasses forward them unchanged, see :class:`GrowthArgs`):
        min_batch, max_batch: bounds (multiples of ``granularity``); min None = ``granularity``,
            max None = unbounded.
        growth: smallest factor of a change (> 1); also the width of the hysteresis band.
        min_interval: samples that must pass between two changes (≥ 0).
        granularity: micro-batch × world size; every batch is a multiple of it.
        patience: consecutive readings that must ask for growth before it happens (≥ 1).
        start_samples: no decision before this many samples (the estimator's warm-up).
        min_readings: readings since the last change before the estimate may be acted on (≥ 0).
        max_rse: largest relative standard error of B_simple that counts as settled (> 0);
            None: no spread criterion.
    """

    needs_noise = True

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
        min_readings: int = 20,
        max_rse: float | None = 0.2,
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
        self.min_interval = check_int_nonnegative("min_interval", min_interval)
        self.patience = check_int_positive("patience", patience)
        self.start_samples = check_int_nonnegative("start_samples", start_samples)
        self.min_readings = check_int_nonnegative("min_readings", min_readings)
        self.max_rse = None if max_rse is None else check_positive("max_rse", max_rse)
        # Samples at the last change; the clock starts when the controller first sees the run.
        self._last_change: int | None = None
        self._streak = 0
        self._readings_at_change = 0  # state.n_readings when the batch last changed
        self._settled: dict[str, Any] = {"settled": False, "readings": None, "rse": None}
        self._warned: set[str] = set()

    def config(self) -> dict[str, Any]:
        return {
            "min_batch": self.min_batch,
            "max_batch": self.max_batch,
            "growth": self.growth,
            "min_interval": self.min_interval,
            "granularity": self.granularity,
            "patience": self.patience,
            "start_samples": self.start_samples,
            "min_readings": self.min_readings,
            "max_rse": self.max_rse,
        }

    def _runtime_state(self) -> dict[str, Any]:
        return {"last_change": self._last_change, "streak": self._streak,
                "readings_at_change": self._readings_at_change, "settled": dict(self._settled)}

    def _load_runtime_state(self, state: Mapping[str, Any]) -> None:
        last = state.get("last_change")
        self._last_change = None if last is None else check_int_nonnegative("last_change", last)
        self._streak = check_int_nonnegative("streak", state.get("streak", 0))
        self._readings_at_change = check_int_nonnegative("readings_at_change", state.get("readings_at_change", 0))
        settled = state.get("settled") or {}
        self._settled = {"settled": bool(settled.get("settled", False)), "readings": settled.get("readings"),
                         "rse": settled.get("rse")}

    @property
    def settled(self) -> dict[str, Any]:
        """The last verdict: ``{"settled": bool, "readings": since the last change, "rse": b_simple_rse}``."""
        return dict(self._settled)

    def _warn_once(self, field: str, criterion: str) -> None:
        if field not in self._warned:
            self._warned.add(field)
            warnings.warn(f"{type(self).__name__}: the controller state carries no {field}, so the settled check "
                          f"({criterion}) is not applied; build it with ControllerState.from_estimator",
                          RuntimeWarning, stacklevel=4)

    def _is_settled(self, state: ControllerState) -> bool:
        """Whether the estimate may be acted on (see the class docstring); records the verdict."""
        ok, since, rse = True, None, state.b_simple_rse
        if state.n_readings is None:
            if self.min_readings > 0:
                self._warn_once("n_readings", f"min_readings={self.min_readings}")
        else:
            # A reading count below the one at the last change: the estimator was reset or replaced.
            self._readings_at_change = min(self._readings_at_change, state.n_readings)
            since = state.n_readings - self._readings_at_change
            ok = since >= self.min_readings
        if self.max_rse is not None:
            if rse is None:
                self._warn_once("b_simple_rse", f"max_rse={self.max_rse:g}")
            else:
                ok = ok and rse <= self.max_rse  # NaN and inf are not settled
        self._settled = {"settled": ok, "readings": since, "rse": rse}
        return ok

    def _changed(self, state: ControllerState) -> None:
        self._last_change = state.samples
        if state.n_readings is not None:
            self._readings_at_change = state.n_readings

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
            self._changed(state)
            return self._change(state, self.min_batch, f"batch {b} below min_batch {self.min_batch}")
        if self.max_batch is not None and b > self.max_batch:
            self._changed(state)
            return self._change(state, self.max_batch, f"batch {b} above max_batch {self.max_batch}")
        if state.samples < self.start_samples:
            return b
        req = self._requested(state)
        if req is None or not self._is_settled(state):
            return b  # no usable (or no settled) reading: neither counts towards patience nor resets it
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
        self._changed(state)
        return self._change(state, new, why)

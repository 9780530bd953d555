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
- :class:`ScheduleController`: a batch-size schedule in samples in Megatron's threshold form
  (``"0:64,20000:128"``), e.g. the one ``bigbatch plan --write-schedule`` derives from a study.

Every decision is *realisable*: a multiple of ``granularity`` (micro-batch × world size, so the
trainer realises it with an integer number of accumulation steps) within [min_batch, max_batch].
Readings that are missing, NaN, infinite or not positive (early in training the unbiased
estimates of McCandlish App. A.1 are often negative) are ignored: the controller does not act;
nor does it act on an estimate that has not *settled* (too few readings since the last change, or
too wide a spread; see :class:`GrowthController`). ``controller.needs_noise`` says whether the
controller decides from noise readings at all. Time is counted in samples, so ``min_interval``
and ramps are in samples.
"""

from __future__ import annotations

import inspect
from typing import Any

from bigbatch._checks import check_choice
from bigbatch.adaptive.base import BatchSizeChange, BatchSizeController, ControllerState, GrowthArgs, GrowthController
from bigbatch.adaptive.ramp import RampController
from bigbatch.adaptive.schedule import ScheduleController, load_batch_schedule, parse_batch_schedule
from bigbatch.adaptive.statistics import NoiseScaleController, NormTestController

__all__ = [
    "ControllerState",
    "BatchSizeChange",
    "BatchSizeController",
    "GrowthController",
    "GrowthArgs",
    "NoiseScaleController",
    "NormTestController",
    "RampController",
    "ScheduleController",
    "parse_batch_schedule",
    "load_batch_schedule",
    "CONTROLLERS",
    "create_controller",
    "controller_arguments",
]


CONTROLLERS: dict[str, type[BatchSizeController]] = {
    NoiseScaleController.name: NoiseScaleController,
    NormTestController.name: NormTestController,
    RampController.name: RampController,
    ScheduleController.name: ScheduleController,
}


def controller_arguments(cls: type[BatchSizeController]) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls`` takes, following ``**kwargs`` forwarded to its base classes."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init).parameters
        for p, v in sig.items():
            if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD:
                params.setdefault(p, v)
        if not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in sig.values()):
            break  # this constructor forwards nothing further up
    return params


def create_controller(name: str, **kwargs: Any) -> BatchSizeController:
    """Build a controller by name (noise, normtest, ramp); unknown names or arguments raise ValueError."""
    cls = CONTROLLERS[check_choice("adaptive controller", name, CONTROLLERS)]
    params = controller_arguments(cls)
    valid = list(params)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for controller {name!r}; valid: {', '.join(valid)}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"controller {name!r} needs argument(s) {', '.join(missing)}")
    return cls(**kwargs)

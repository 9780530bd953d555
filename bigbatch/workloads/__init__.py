"""Built-in workloads and the ``Workload`` protocol users implement.

``load_workload("mnist1d", model="mlp")`` builds a built-in; ``load_workload("my.module:factory",
**kwargs)`` imports ``my.module`` and calls ``factory(**kwargs)``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from bigbatch._checks import check_choice
from bigbatch.workloads.base import Batch, EpochSampler, StreamSampler, Workload, WorkloadDefaults, move_batch

__all__ = [
    "Batch",
    "EpochSampler",
    "StreamSampler",
    "Workload",
    "WorkloadDefaults",
    "WORKLOADS",
    "load_workload",
    "move_batch",
    "parse_workload_args",
]


#: Built-in workloads by name → ``module:factory`` (imported only when used).
WORKLOADS: dict[str, str] = {
    "mnist1d": "bigbatch.workloads.mnist1d:MNIST1D",
    "bytelm": "bigbatch.workloads.bytelm:ByteLM",
    "linreg": "bigbatch.workloads.linreg:LinReg",
}

_REQUIRED = ("build_model", "sampler", "fetch", "loss", "count", "evaluate")
_ATTRS = ("metric_name", "higher_is_better", "dataset_size", "count_unit", "defaults")


def _resolve(spec: str) -> Callable[..., Any]:
    path = WORKLOADS[check_choice("workload", spec, WORKLOADS)] if ":" not in spec else spec
    mod_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"workload module {mod_name!r} cannot be imported: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"workload module {mod_name!r} has no attribute {attr!r}")
    return factory


def load_workload(spec: str, **kwargs: Any) -> Workload:
    """A workload by built-in name or ``module:factory`` path, built with ``kwargs``."""
    factory = _resolve(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for k in kwargs:
            if k not in params:
                raise ValueError(f"--workload-arg {k!r} is not an argument of workload {spec!r}; valid: {', '.join(params)}")
    workload = factory(**kwargs)
    missing = [m for m in _REQUIRED if not callable(getattr(workload, m, None))]
    missing += [a for a in _ATTRS if not hasattr(workload, a)]
    if missing:
        raise ValueError(f"workload {spec!r} does not implement the Workload protocol: missing {', '.join(missing)}")
    return workload


def parse_workload_args(items: list[str]) -> dict[str, Any]:
    """``["model=mlp", "num_samples=4000"]`` → ``{"model": "mlp", "num_samples": 4000}`` (ints, floats, bools parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--workload-arg must be key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v

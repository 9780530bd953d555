"""``NoiseReading``: what ``NoiseMonitor.end_step()`` returns, resolved lazily.

Its values stay on the device until first read, so a loop that reads them only when it logs
pays one host sync per log interval instead of one per step.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["NoiseReading"]


class NoiseReading:
    """Estimates after one step. Reading any attribute brings pending steps to the host.

    ``b_simple``, ``grad_sqnorm``, ``trace_sigma``: the EMA estimates after this step (loss units:
    examples or tokens). ``b_simple_samples``: ``b_simple`` in examples (when the loop passed
    ``samples``). ``valid``: this step contributed a reading. ``b_small``/``b_big``: the two
    batch sizes it used. ``grad_sqnorm_step``/``trace_sigma_step``: the step's single unbiased
    estimates (may be negative). ``groups``: per-group ``{b_simple, grad_sqnorm, trace_sigma}``.
    """

    __slots__ = ("step", "_monitor", "_values")

    def __init__(self, monitor: Any, step: int) -> None:
        self.step = step
        self._monitor = monitor
        self._values: dict[str, Any] | None = None

    def _set(self, values: dict[str, Any]) -> None:
        self._values = values
        self._monitor = None  # resolved; do not keep the monitor alive

    def _get(self, key: str) -> Any:
        if self._values is None:
            self._monitor.flush()
        assert self._values is not None
        return self._values[key]

    @property
    def valid(self) -> bool:
        return bool(self._get("valid"))

    @property
    def b_simple(self) -> float:
        return self._get("b_simple")

    @property
    def grad_sqnorm(self) -> float:
        return self._get("grad_sqnorm")

    @property
    def trace_sigma(self) -> float:
        return self._get("trace_sigma")

    @property
    def b_simple_samples(self) -> float | None:
        return self._get("b_simple_samples")

    @property
    def b_small(self) -> float:
        return self._get("b_small")

    @property
    def b_big(self) -> float:
        return self._get("b_big")

    @property
    def grad_sqnorm_step(self) -> float:
        return self._get("grad_sqnorm_step")

    @property
    def trace_sigma_step(self) -> float:
        return self._get("trace_sigma_step")

    @property
    def n_updates(self) -> int:
        return int(self._get("n_updates"))

    @property
    def groups(self) -> dict[str, dict[str, float]]:
        return self._get("groups")

    def as_dict(self) -> dict[str, float]:
        """Metrics keys: ``b_simple``, ``grad_sqnorm``, ``trace_sigma`` (+ ``b_simple_samples``,
        ``b_simple/<group>``, ``grad_sqnorm/<group>``, ``trace_sigma/<group>`` when available)."""
        out = {"b_simple": self.b_simple, "grad_sqnorm": self.grad_sqnorm, "trace_sigma": self.trace_sigma}
        if self.b_simple_samples is not None:
            out["b_simple_samples"] = self.b_simple_samples
        for name, vals in self.groups.items():
            for k, v in vals.items():
                out[f"{k}/{name}"] = v
        return out

    def __repr__(self) -> str:
        if self._values is None:
            return f"NoiseReading(step={self.step}, pending)"
        b = self._values["b_simple"]
        return f"NoiseReading(step={self.step}, valid={self._values['valid']}, b_simple={b if math.isnan(b) else round(b, 4)})"

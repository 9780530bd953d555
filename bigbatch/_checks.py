"""Argument validation shared by every module: one place for the error wording.

Errors name the parameter and the allowed range, as torch.optim's constructors do
(``ValueError("lr must be > 0, got -0.1")``). NaN never passes a range check.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = [
    "check_positive",
    "check_nonnegative",
    "check_in_range",
    "check_int_positive",
    "check_int_nonnegative",
    "check_choice",
    "closest",
]


def _finite_number(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(x):
        raise ValueError(f"{name} must be a number, got nan")
    return x


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """``value > 0`` (and finite unless ``allow_inf``)."""
    x = _finite_number(name, value)
    if not x > 0 or (math.isinf(x) and not allow_inf):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return x


def check_nonnegative(name: str, value: Any) -> float:
    """``value >= 0`` and finite."""
    x = _finite_number(name, value)
    if not x >= 0 or math.isinf(x):
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
    return x


def check_in_range(
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = False,
) -> float:
    """``lo <= value < hi`` by default; brackets in the message show which ends are included."""
    x = _finite_number(name, value)
    ok_lo = x >= lo if lo_inclusive else x > lo
    ok_hi = x <= hi if hi_inclusive else x < hi
    if not (ok_lo and ok_hi):
        lb = "[" if lo_inclusive else "("
        rb = "]" if hi_inclusive else ")"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return x


def _integer(name: str, value: Any, requirement: str) -> int:
    """``value`` as an int (bools refused; integral floats such as 4000.0 accepted)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    if not isinstance(value, int):
        try:
            if float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be {requirement}, got {value!r}") from None
    return int(value)


def check_int_positive(name: str, value: Any) -> int:
    """A positive integer (bools refused)."""
    x = _integer(name, value, "a positive integer")
    if x <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return x


def closest(name: str, options: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` valid names closest to ``name`` (difflib), for 'did you mean' messages."""
    import difflib

    return difflib.get_close_matches(name, list(options), n=n, cutoff=0.4)


def check_int_nonnegative(name: str, value: Any) -> int:
    """An integer >= 0 (bools refused; integral floats such as 4000.0 accepted)."""
    x = _integer(name, value, "an integer >= 0")
    if x < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return x


def check_choice(what: str, value: str, options: Iterable[str]) -> str:
    """``value`` must be one of ``options``; the error lists them and the closest ones."""
    opts = list(options)
    if value in opts:
        return value
    near = closest(str(value), opts)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise ValueError(f"unknown {what} {value!r}{hint}; valid: {', '.join(opts)}")

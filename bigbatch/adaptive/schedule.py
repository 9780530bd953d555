"""A batch-size schedule in samples (Megatron's threshold form) and the controller that follows it.

Megatron-LM writes a batch-size schedule as thresholds: ``"0:768 250B:1536"`` means batch 768
from the start and 1536 once 250·10⁹ samples (there: tokens) were consumed. We accept the same
form with commas or spaces between entries, and the suffixes K, M, B, T (10³, 10⁶, 10⁹, 10¹²) on
the thresholds. The unit is whatever the trainer counts (examples, sequences or tokens): the
schedule is a pure function of that counter, like the LR schedules (timm's schedulers are given
the count; so is this).

``bigbatch plan --write-schedule`` derives such a schedule from the critical batch size measured
at several targets (``bigbatch.plan.derive_schedule``).
"""

from __future__ import annotations

import re
import warnings
from bisect import bisect_right
from pathlib import Path
from typing import Any, Mapping, Sequence

from bigbatch._checks import check_int_nonnegative, check_int_positive
from bigbatch.adaptive.base import BatchSizeController, ControllerState

__all__ = [
    "ScheduleController",
    "parse_batch_schedule",
    "format_batch_schedule",
    "load_batch_schedule",
    "check_batch_schedule",
]

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_THRESHOLD = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([KMBGT]?)$", re.IGNORECASE)


def _threshold(text: str, entry: str) -> int:
    m = _THRESHOLD.match(text)
    if m is None:
        raise ValueError(
            f"batch schedule threshold {text!r} in {entry!r} is not a number of samples "
            "(an integer, optionally with a suffix K, M, B or T, e.g. 250B)"
        )
    num, suffix = m.group(1), m.group(2).upper()
    mult = _SUFFIX[suffix]
    # Exact decimal arithmetic: "2.5M" is 2500000 exactly, "1.5" samples is refused.
    whole, _, frac = num.partition(".")
    frac = frac.rstrip("0")
    scaled = int(whole or "0") * mult
    if frac:
        den = 10 ** len(frac)
        if (int(frac) * mult) % den:
            raise ValueError(f"batch schedule threshold {text!r} in {entry!r} is not a whole number of samples")
        scaled += int(frac) * mult // den
    return scaled


def check_batch_schedule(schedule: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate ``(samples, batch)`` pairs: first threshold 0, thresholds increasing, batches > 0."""
    out: list[tuple[int, int]] = []
    try:
        pairs = [tuple(p) for p in schedule]
    except TypeError:
        raise ValueError(f"batch schedule must be a sequence of (samples, batch) pairs, got {schedule!r}") from None
    if not pairs:
        raise ValueError("batch schedule is empty; give at least one entry '0:BATCH'")
    for i, p in enumerate(pairs):
        if len(p) != 2:
            raise ValueError(f"batch schedule entry {i} must be a (samples, batch) pair, got {p!r}")
        s = check_int_nonnegative(f"batch schedule threshold {i}", p[0])
        b = check_int_positive(f"batch schedule batch size at {s} samples", p[1])
        if i == 0 and s != 0:
            raise ValueError(f"batch schedule must start at threshold 0 (the batch from the start), got {s}")
        if out and s <= out[-1][0]:
            raise ValueError(
                f"batch schedule thresholds must be strictly increasing, got {s} after {out[-1][0]}"
            )
        out.append((s, b))
    return out


def parse_batch_schedule(text: str) -> list[tuple[int, int]]:
    """Parse ``"0:64,20000:128,1M:256"`` (commas or spaces between entries) into ``(samples, batch)`` pairs.

    Thresholds take the suffixes K, M, B, T (10³…10¹²; ``250B`` is 250·10⁹); batches are plain
    positive integers. The first threshold must be 0 and the thresholds strictly increasing.
    Lines starting with ``#`` are comments (so a schedule file can say where it came from).
    """
    if not isinstance(text, str):
        raise ValueError(f"batch schedule must be a string like '0:64,20000:128', got {text!r}")
    body = " ".join(line.split("#", 1)[0] for line in text.splitlines())
    entries = [e for e in re.split(r"[,\s]+", body) if e]
    if not entries:
        raise ValueError("batch schedule is empty; expected entries like '0:64,20000:128'")
    pairs = []
    for e in entries:
        parts = e.split(":")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"batch schedule entry {e!r} must be SAMPLES:BATCH, e.g. 20000:128")
        s = _threshold(parts[0], e)
        if not parts[1].isdigit():
            raise ValueError(f"batch schedule batch size {parts[1]!r} in {e!r} must be a positive integer")
        pairs.append((s, int(parts[1])))
    return check_batch_schedule(pairs)


def format_batch_schedule(schedule: Sequence[tuple[int, int]]) -> str:
    """The threshold form ``"0:64,20000:128"`` (plain integers: exact, and readable by Megatron after
    replacing the commas with spaces)."""
    return ",".join(f"{s}:{b}" for s, b in check_batch_schedule(schedule))


def load_batch_schedule(value: str | Path) -> list[tuple[int, int]]:
    """A schedule from a file (``--batch-schedule FILE``) or from the threshold form itself."""
    p = Path(value)
    looks_inline = isinstance(value, str) and ":" in value and not p.is_file()
    if not looks_inline:
        if not p.is_file():
            raise FileNotFoundError(f"batch_schedule file not found: {value} (or give the schedule inline, e.g. '0:64,20000:128')")
        try:
            return parse_batch_schedule(p.read_text())
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    return parse_batch_schedule(str(value))


class ScheduleController(BatchSizeController):
    """Follow a batch-size schedule given as ``(samples, batch)`` thresholds.

    The batch after ``s`` samples is the one of the last threshold ≤ ``s`` (Megatron's threshold
    form). The readings are not used. It is a pure function of samples seen, so resuming needs
    nothing but the samples counter; the ``changes`` log is kept in ``state_dict``.

    Args:
        schedule: the threshold form (``"0:64,20000:128"``) or a sequence of ``(samples, batch)``.
        granularity: micro-batch × world size; every batch of the schedule must be a multiple.
    """

    name = "schedule"

    def __init__(self, *, schedule: str | Sequence[tuple[int, int]], granularity: int = 1) -> None:
        super().__init__(granularity=granularity)
        self.schedule = parse_batch_schedule(schedule) if isinstance(schedule, str) else check_batch_schedule(schedule)
        g = self.granularity
        bad = [b for _, b in self.schedule if b % g]
        if bad:
            raise ValueError(
                f"batch schedule batch sizes must be multiples of granularity {g} (micro-batch × world size), "
                f"got {', '.join(map(str, bad))}"
            )
        self._thresholds = [s for s, _ in self.schedule]

    def config(self) -> dict[str, Any]:
        return {"schedule": format_batch_schedule(self.schedule), "granularity": self.granularity}

    def batch_size_at(self, samples: int) -> int:
        """The schedule's batch after ``samples`` samples (a pure function)."""
        samples = check_int_nonnegative("samples", samples)
        return self.schedule[bisect_right(self._thresholds, samples) - 1][1]

    def next_batch_size(self, state: ControllerState) -> int:
        self._check_current(state)
        i = bisect_right(self._thresholds, state.samples) - 1
        threshold, new = self.schedule[i]
        return self._change(state, new, f"schedule: {state.samples} samples >= threshold {threshold}")

    def _runtime_state(self) -> dict[str, Any]:
        # Not needed to resume (the batch is a function of samples), but lets a resume notice that
        # the schedule was edited between runs.
        return {"schedule": format_batch_schedule(self.schedule)}

    def _load_runtime_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("schedule")
        if saved is not None:
            saved_pairs = parse_batch_schedule(saved)
            if saved_pairs != self.schedule:
                warnings.warn(
                    f"the checkpoint's batch schedule {format_batch_schedule(saved_pairs)!r} differs from "
                    f"this run's {format_batch_schedule(self.schedule)!r}; following this run's",
                    stacklevel=3,
                )

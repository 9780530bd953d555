"""A batch-size schedule derived from the critical batch size measured at several targets.

The critical batch size grows as the loss falls (McCandlish et al. 2018, §3.2 and Fig. 5;
Merrill et al. 2025 follow it on OLMo). Given fits at targets t₁ (easiest) … t_k (hardest),
stage i trains at ``B_i = factor · B_crit(t_i)`` (rounded to a multiple of ``granularity``), and
the batch grows to ``B_{i+1}`` once the run has passed t_i.

When is t_i passed? We use the fit of that stage's target, ``E_i(B_i) = E_min,i (1 + B_i/B_noise,i)``
— the samples to reach t_i had the whole run used B_i — rather than the cells' measured
``samples_to_target``: the fit exists at any batch (the cells only at the measured ones) and
averages their seed noise. It is conservative for a growing schedule: the earlier stages ran at
smaller batches, which spend fewer samples per unit of progress (E(B) increases with B), so the
run reaches t_i at or before E_i(B_i) and the batch grows no earlier than the target is passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from bigbatch._checks import check_int_positive, check_positive
from bigbatch.adaptive.schedule import format_batch_schedule
from bigbatch.plan.study import StudyFits, TargetFit, target_text
from bigbatch.plan.tradeoff import samples_at

__all__ = ["DerivedSchedule", "derive_schedule", "round_batch"]


def _ceil(x: float) -> int:
    """Ceil that ignores float noise (E_min·(1 + B/B_noise) of whole numbers often lands 1e-11 above)."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def round_batch(b: float, granularity: int) -> int:
    """The nearest multiple of ``granularity`` (at least ``granularity``)."""
    g = check_int_positive("--granularity", granularity)
    return max(g, int(round(b / g)) * g)


@dataclass(slots=True)
class DerivedSchedule:
    """The schedule as ``(samples, batch)`` thresholds, the stages behind it, and what was merged."""

    schedule: list[tuple[int, int]]
    stages: list[dict[str, Any]]
    factor: float
    granularity: int
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The threshold form, ``"0:64,20000:128"``."""
        return format_batch_schedule(self.schedule)

    def file_text(self, source: str = "") -> str:
        """The schedule file: comment lines saying where it came from, then the threshold form."""
        lines = [f"# batch-size schedule from bigbatch plan{' --study ' + source if source else ''}"
                 f" (factor {self.factor:g}, granularity {self.granularity})"]
        for st in self.stages:
            lines.append(
                f"# target {target_text(st['target'])}: B_crit {st['b_crit']:.4g} -> batch {st['batch']} "
                f"from {st['from_samples']} samples; reached at ~{st['reached_at']:.4g} samples (E(B) of its fit)"
            )
        lines += [f"# note: {n}" for n in self.notes]
        lines.append(self.text())
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.text(), "pairs": [list(p) for p in self.schedule], "stages": self.stages,
                "factor": self.factor, "granularity": self.granularity, "notes": list(self.notes)}


def derive_schedule(fits: StudyFits | Sequence[TargetFit], *, factor: float = 1.0, granularity: int = 1) -> DerivedSchedule:
    """Grow the batch through ``factor·B_crit`` of each target as the run passes the previous target.

    ``fits`` is a study's fits (ordered from the easiest to the hardest target by the metric's
    direction) or a sequence already in that order. Undetermined targets are skipped, and a
    target whose rounded batch does not exceed the previous one is merged into it (the schedule
    only grows); both are said in ``notes``.
    """
    factor = check_positive("--factor", factor)
    granularity = check_int_positive("--granularity", granularity)
    notes: list[str] = []
    if isinstance(fits, StudyFits):
        ordered = fits.ordered()
        skipped = [f for f in fits.fits if not f.determined]
    else:
        ordered = [f for f in fits if f.determined]
        skipped = [f for f in fits if not f.determined]
    for f in skipped:
        notes.append(f"target {f.target}: B_crit undetermined ({f.reason}); left out of the schedule")
    if not ordered:
        raise ValueError("a batch-size schedule needs B_crit at one target at least; none is determined")
    if len(ordered) == 1:
        notes.append("one target only: the schedule is a constant batch (a study over several targets grows it)")
    schedule: list[tuple[int, int]] = []
    stages: list[dict[str, Any]] = []
    start = 0
    batch = None
    for f in ordered:
        want = round_batch(factor * f.b_noise, granularity)
        if batch is not None and want <= batch:
            notes.append(
                f"target {target_text(f.target)}: factor x B_crit rounds to {want}, not above the current batch {batch}; "
                "kept the current batch (the schedule only grows)"
            )
        elif batch is None or want > batch:
            if stages:
                # The previous stage's target is passed when its fit says, at the batch it ran.
                at = _ceil(stages[-1]["reached_at"])
                if at <= start:
                    notes.append(
                        f"target {target_text(stages[-1]['target'])}: its fit says it is reached at {at} samples, not after the "
                        f"previous threshold {start} (fits disagree across targets); the batch grows at {start + 1}"
                    )
                start = max(start + 1, at)
            batch = want
            schedule.append((start, batch))
        reached = samples_at(batch, f.e_min, f.b_noise)  # type: ignore[arg-type]
        stages.append({"target": f.target, "b_crit": f.b_noise, "batch": batch, "from_samples": schedule[-1][0],
                       "reached_at": reached})
    return DerivedSchedule(schedule=schedule, stages=stages, factor=factor, granularity=granularity, notes=notes)

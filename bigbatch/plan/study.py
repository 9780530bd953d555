"""Reading a study's ``results.json`` into one McCandlish fit per target.

Two layouts are read: today's single-target study (top-level ``b_crit``, ``s_min``, ``e_min``,
``b_crit_interval``, ``b_simple``, ``target``, ``notes``), and a multi-target study that adds
``by_target: [{target, b_crit, b_crit_interval, s_min, e_min, b_simple, cells_reached}, ...]``.
When ``by_target`` is present it is authoritative (the top-level keys then describe one of
its entries). A fit may be undetermined (``b_crit`` null): it is kept, with the reason, so the
planner can say so instead of planning on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TargetFit", "StudyFits", "read_study", "fits_from_results", "target_text"]


@dataclass(frozen=True, slots=True)
class TargetFit:
    """The trade-off S(B) = S_min(1 + B_noise/B), E(B) = E_min(1 + B/B_noise) at one target."""

    target: float | None
    """The metric value the runs had to reach."""
    s_min: float | None
    """Minimum optimizer steps to the target (B → ∞); None when undetermined."""
    e_min: float | None
    """Minimum samples to the target (B → 0); None when undetermined."""
    b_crit: float | None
    """Critical batch size E_min/S_min (= B_noise in the model); None when undetermined."""
    b_crit_interval: tuple[float, float] | None = None
    """Bootstrap interval of B_crit, when the study computed one."""
    b_simple: float | None = None
    """The simple noise scale measured at the target, when the monitor was on."""
    cells_reached: int | None = None
    """How many cells reached this target (multi-target studies)."""
    reason: str | None = None
    """Why the fit is undetermined (None when it is determined)."""

    @property
    def determined(self) -> bool:
        """True when S_min, E_min and B_crit are usable numbers."""
        return self.reason is None

    @property
    def b_noise(self) -> float:
        """B_noise = E_min/S_min (McCandlish et al. 2018: E_min = S_min·B_noise)."""
        if not self.determined:
            raise ValueError(f"the fit at target {self.target} is undetermined: {self.reason}")
        return self.e_min / self.s_min  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class StudyFits:
    """All targets of a study, in the order the study lists them, plus what the planner needs."""

    fits: tuple[TargetFit, ...]
    higher_is_better: bool
    metric_name: str | None
    workload: str | None
    source: str
    notes: tuple[str, ...] = ()

    def hardest(self) -> TargetFit:
        """The hardest determined target (lowest loss, or highest accuracy); ValueError when none is."""
        ok = [f for f in self.fits if f.determined]
        if not ok:
            reasons = "; ".join(f"target {f.target}: {f.reason}" for f in self.fits)
            raise ValueError(f"no target of {self.source} has a determined B_crit ({reasons}); nothing to plan on")
        with_target = [f for f in ok if f.target is not None]
        if not with_target:
            return ok[-1]
        return (max if self.higher_is_better else min)(with_target, key=lambda f: f.target)

    def ordered(self) -> list[TargetFit]:
        """Determined targets from the easiest to the hardest (the order the loss passes them)."""
        ok = [f for f in self.fits if f.determined]
        if any(f.target is None for f in ok):  # only a single-target file may omit it: nothing to order
            return ok
        return sorted(ok, key=lambda f: f.target, reverse=not self.higher_is_better)  # type: ignore[arg-type, return-value]


def target_text(target: float | None) -> str:
    """A target for messages: ``0.5``, or ``?`` when the study did not record it."""
    return "?" if target is None else f"{target:g}"


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _fit(entry: Mapping[str, Any], where: str, default_reason: str | None) -> TargetFit:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object with b_crit, s_min, e_min, got {type(entry).__name__}")
    target = _number(entry.get("target"))
    s_min, e_min, b_crit = (_number(entry.get(k)) for k in ("s_min", "e_min", "b_crit"))
    interval = entry.get("b_crit_interval")
    iv = None
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_number(v) is not None for v in interval):
        iv = (float(interval[0]), float(interval[1]))
    reason = None
    if b_crit is None or s_min is None or e_min is None:
        given = entry.get("reason") or entry.get("b_crit_reason") or default_reason
        reason = str(given) if given else "the study could not fit B_crit at this target (b_crit is null)"
        s_min = e_min = b_crit = None
    else:
        for k, v in (("s_min", s_min), ("e_min", e_min), ("b_crit", b_crit)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{where}.{k} must be a finite number > 0, got {v!r}")
    cells = entry.get("cells_reached")
    return TargetFit(
        target=target, s_min=s_min, e_min=e_min, b_crit=b_crit, b_crit_interval=iv,
        b_simple=_number(entry.get("b_simple")), cells_reached=cells if isinstance(cells, int) else None,
        reason=reason,
    )


def fits_from_results(results: Mapping[str, Any], source: str = "results.json") -> StudyFits:
    """The fits of a parsed ``results.json``; ValueError naming the key when it is malformed."""
    if not isinstance(results, Mapping):
        raise ValueError(f"{source} must hold a JSON object, got {type(results).__name__}")
    notes = tuple(str(n) for n in results.get("notes") or [] if isinstance(n, str))
    by_target = results.get("by_target")
    if by_target is not None:
        if not isinstance(by_target, list) or not by_target:
            raise ValueError(f"{source}: by_target must be a non-empty list of per-target fits")
        fits = tuple(_fit(e, f"{source}: by_target[{i}]", None) for i, e in enumerate(by_target))
        for i, f in enumerate(fits):
            # The targets order the schedule and name the tables: each entry must say which it is.
            if f.target is None:
                raise ValueError(f"{source}: by_target[{i}].target must be a number, got {by_target[i].get('target')!r}")
    else:
        if "b_crit" not in results:
            raise ValueError(f"{source} has neither b_crit nor by_target: not the results of `bigbatch study`")
        # Today's study states why a fit is missing in its notes; the one about B_crit is the reason.
        why = next((n for n in notes if "B_crit" in n), None)
        fits = (_fit(results, source, why),)
    consistency = []
    for f in fits:
        # The model ties the three: E_min = S_min·B_noise, B_crit = B_noise. A mismatch means the
        # file was edited or written by something else; the planner uses E_min/S_min.
        if f.determined and abs(f.e_min / f.s_min - f.b_crit) > 1e-3 * f.b_crit:  # type: ignore[operator]
            consistency.append(
                f"target {f.target}: b_crit {f.b_crit:g} differs from e_min/s_min = {f.e_min / f.s_min:g}; "  # type: ignore[operator]
                "planning with e_min/s_min"
            )
    return StudyFits(
        fits=fits,
        higher_is_better=bool(results.get("higher_is_better", False)),
        metric_name=results.get("metric_name"),
        workload=results.get("workload"),
        source=source,
        notes=notes + tuple(consistency),
    )


def read_study(path: str | Path) -> StudyFits:
    """The fits of a study directory (or its ``results.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"--study: no results.json at {p} (run `bigbatch study` first, or name its directory)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--study: {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return fits_from_results(data, str(p))

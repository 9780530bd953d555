"""The closed-form time–compute trade-off of McCandlish et al. 2018 turned into a plan.

"An Empirical Model of Large-Batch Training" (McCandlish, Kaplan, Amodei et al. 2018), eq. 2.11:
the optimizer steps ``S`` and samples ``E`` needed to reach a fixed target at batch size ``B`` are ::

    S(B) = S_min (1 + B_noise / B),      E(B) = E_min (1 + B / B_noise),

so ``(S/S_min − 1)(E/E_min − 1) = 1``, and at ``B = B_noise`` (= B_crit) both are twice their
minimum. A plan adds hardware: with a per-GPU throughput ``T`` (samples/s) and a scaling
efficiency ``η``, ``G`` GPUs need ``E(B) / (T·G·η)`` seconds and ``G`` times that in GPU-time.
The throughput is taken as independent of the per-GPU batch (accumulation keeps the
micro-batch fixed), which is what makes the table a function of B and G alone.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from bigbatch._checks import check_in_range, check_int_positive, check_positive
from bigbatch.plan.study import TargetFit

__all__ = [
    "Candidate",
    "Plan",
    "steps_at",
    "samples_at",
    "candidate_batch_sizes",
    "make_plan",
    "fastest_within",
    "cheapest_within",
    "parse_duration",
    "throughput_from_run",
]


def steps_at(batch_size: float, s_min: float, b_noise: float) -> float:
    """``S(B) = S_min (1 + B_noise/B)`` (McCandlish et al. 2018, eq. 2.11)."""
    return s_min * (1.0 + b_noise / batch_size)


def samples_at(batch_size: float, e_min: float, b_noise: float) -> float:
    """``E(B) = E_min (1 + B/B_noise)`` (McCandlish et al. 2018, eq. 2.11)."""
    return e_min * (1.0 + batch_size / b_noise)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (batch size, GPU count) and what it costs to reach the target."""

    batch_size: int
    gpus: int | None
    """None when no throughput was given (the plan is then in steps and samples only)."""
    steps: float
    """Optimizer steps from the fit, S(B) (not rounded)."""
    samples: float
    """Samples from the fit, E(B) = B·S(B) (not rounded)."""
    wall_seconds: float | None
    gpu_hours: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Plan:
    """Candidates for one target, with the marked choices."""

    fit: TargetFit
    candidates: list[Candidate]
    fastest: Candidate | None = None
    """Fastest candidate within the GPU-hour budget (None without a budget, or when none fits)."""
    cheapest: Candidate | None = None
    """Cheapest candidate within the deadline (None without a deadline, or when none fits)."""
    notes: list[str] = field(default_factory=list)

    @property
    def knee(self) -> dict[str, float]:
        """B = B_noise, where S = 2·S_min and E = 2·E_min."""
        f = self.fit
        b = f.b_noise
        return {"batch_size": b, "steps": steps_at(b, f.s_min, b), "samples": samples_at(b, f.e_min, b)}  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        f = self.fit
        return {
            "target": f.target,
            "b_crit": f.b_crit,
            "b_noise": f.b_noise,
            "b_crit_interval": list(f.b_crit_interval) if f.b_crit_interval else None,
            "s_min": f.s_min,
            "e_min": f.e_min,
            "b_simple": f.b_simple,
            "knee": self.knee,
            "candidates": [c.to_dict() for c in self.candidates],
            "fastest_within_budget": self.fastest.to_dict() if self.fastest else None,
            "cheapest_within_deadline": self.cheapest.to_dict() if self.cheapest else None,
            "notes": list(self.notes),
        }


def candidate_batch_sizes(b_noise: float, span: int = 4, extra: Iterable[int] = ()) -> list[int]:
    """Powers of two from ``span`` octaves below B_noise to ``span`` above, plus ``extra``."""
    b_noise = check_positive("b_noise", b_noise)
    span = int(span)
    if span < 0:
        raise ValueError(f"span must be >= 0, got {span}")
    centre = round(math.log2(b_noise))
    out = {2**k for k in range(max(0, centre - span), centre + span + 1)}
    out.update(check_int_positive("--batch-sizes", b) for b in extra)
    return sorted(out)


def make_plan(
    fit: TargetFit,
    batch_sizes: Sequence[int],
    *,
    gpus: Sequence[int] | None = None,
    micro_batch: int = 1,
    throughput: float | None = None,
    efficiency: float = 1.0,
    budget_gpu_hours: float | None = None,
    deadline_seconds: float | None = None,
    required: Iterable[int] = (),
) -> Plan:
    """Candidates for every realisable (batch size, GPU count) pair at ``fit``'s target.

    A pair is realisable when the per-GPU batch B/G is a whole multiple of ``micro_batch``
    (the trainer runs B/G/micro_batch accumulation steps). Pairs that are not are left out and
    counted in the notes; a batch size in ``required`` (the user's ``--batch-sizes``) that no GPU
    count realises is an error. Without ``throughput`` there is no time: one candidate per batch
    size, with ``gpus``/``wall_seconds``/``gpu_hours`` None.
    """
    if not fit.determined:
        raise ValueError(f"B_crit at target {fit.target} is undetermined ({fit.reason}); cannot plan on it")
    micro_batch = check_int_positive("--micro-batch", micro_batch)
    efficiency = check_in_range("--efficiency", efficiency, 0.0, 1.0, lo_inclusive=False, hi_inclusive=True)
    if throughput is None:
        for flag, v in (("--gpus", gpus), ("--budget-gpu-hours", budget_gpu_hours), ("--deadline", deadline_seconds)):
            if v is not None:
                raise ValueError(f"{flag} needs a per-GPU throughput: give --throughput or --throughput-from")
        if efficiency != 1.0:
            raise ValueError("--efficiency needs a per-GPU throughput: give --throughput or --throughput-from")
    else:
        throughput = check_positive("--throughput", throughput)
    gpus = [1, 2, 4, 8] if gpus is None else [check_int_positive("--gpus", g) for g in gpus]
    if not gpus:
        raise ValueError("--gpus must list at least one GPU count, e.g. 1,2,4,8")
    if budget_gpu_hours is not None:
        check_positive("--budget-gpu-hours", budget_gpu_hours)
    if deadline_seconds is not None:
        check_positive("--deadline", deadline_seconds)
    s_min, e_min, b_noise = fit.s_min, fit.e_min, fit.b_noise
    cands: list[Candidate] = []
    skipped = 0
    required = set(required)
    for b in sorted(set(batch_sizes)):
        b = check_int_positive("batch size", b)
        s, e = steps_at(b, s_min, b_noise), samples_at(b, e_min, b_noise)  # type: ignore[arg-type]
        if throughput is None:
            if b % micro_batch:
                if b in required:
                    raise ValueError(f"--batch-sizes {b} is not a multiple of --micro-batch {micro_batch}: not realisable")
                skipped += 1
                continue
            cands.append(Candidate(b, None, s, e, None, None))
            continue
        ok = [g for g in sorted(set(gpus)) if b % (g * micro_batch) == 0]
        skipped += len(set(gpus)) - len(ok)
        if not ok and b in required:
            raise ValueError(
                f"--batch-sizes {b}: the per-GPU batch B/G is not a multiple of --micro-batch {micro_batch} "
                f"for any of --gpus {','.join(map(str, sorted(set(gpus))))}; not realisable"
            )
        for g in ok:
            wall = e / (throughput * g * efficiency)
            cands.append(Candidate(b, g, s, e, wall, wall * g / 3600.0))
    if not cands:
        raise ValueError(
            f"no candidate batch size is realisable with --gpus {','.join(map(str, gpus))} and --micro-batch {micro_batch}; "
            "give --batch-sizes that are multiples of GPUs × micro-batch"
        )
    plan = Plan(fit=fit, candidates=cands)
    if skipped:
        plan.notes.append(
            f"{skipped} (batch size, GPU count) pair(s) left out: the per-GPU batch is not a whole multiple of "
            f"--micro-batch {micro_batch}"
        )
    if budget_gpu_hours is not None:
        plan.fastest = fastest_within(cands, budget_gpu_hours)
        if plan.fastest is None:
            least = min(c.gpu_hours for c in cands)  # type: ignore[type-var]
            plan.notes.append(f"no candidate fits --budget-gpu-hours {budget_gpu_hours:g} (the cheapest needs {least:.3g})")
    if deadline_seconds is not None:
        plan.cheapest = cheapest_within(cands, deadline_seconds)
        if plan.cheapest is None:
            quickest = min(c.wall_seconds for c in cands)  # type: ignore[type-var]
            plan.notes.append(
                f"no candidate meets --deadline {format_duration(deadline_seconds)} (the fastest needs {format_duration(quickest)})"
            )
    return plan


def fastest_within(candidates: Sequence[Candidate], budget_gpu_hours: float) -> Candidate | None:
    """The candidate with the least wall time among those within the GPU-hour budget (ties: cheaper)."""
    ok = [c for c in candidates if c.gpu_hours is not None and c.gpu_hours <= budget_gpu_hours]
    return min(ok, key=lambda c: (c.wall_seconds, c.gpu_hours)) if ok else None


def cheapest_within(candidates: Sequence[Candidate], deadline_seconds: float) -> Candidate | None:
    """The candidate with the fewest GPU-hours among those within the deadline (ties: faster)."""
    ok = [c for c in candidates if c.wall_seconds is not None and c.wall_seconds <= deadline_seconds]
    return min(ok, key=lambda c: (c.gpu_hours, c.wall_seconds)) if ok else None


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, flag: str = "--deadline") -> float:
    """Seconds from ``"90m"``, ``"2h"``, ``"3600s"``, ``"1.5d"`` or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"{flag} must be a duration like 90m, 2h, 3600s or 1.5d, got {text!r}")
    seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if not seconds > 0:
        raise ValueError(f"{flag} must be > 0, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"12.5m"``, ``"3.2h"``, ``"2.1d"``: the unit that keeps the number readable."""
    if seconds < 120:
        return f"{seconds:.3g}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}m"
    if seconds < 172800:
        return f"{seconds / 3600:.3g}h"
    return f"{seconds / 86400:.3g}d"


def throughput_from_run(run_dir: str | Path) -> tuple[float, dict[str, Any]]:
    """Per-GPU samples/s of a ``bigbatch train`` run: median over its steady ``train`` records ÷ world size.

    ``samples_per_s`` in metrics.jsonl is the global batch over the mean step time of a logging
    interval. The first record of the run and the first after each batch-size change are not
    steady (compilation, allocator and data-loader warm-up) and are dropped, unless nothing else
    is left. The world size (and the micro-batch the throughput was measured at) come from the
    run's summary.json.
    """
    d = Path(run_dir)
    metrics, summary = d / "metrics.jsonl", d / "summary.json"
    for p in (metrics, summary):
        if not p.is_file():
            raise FileNotFoundError(f"--throughput-from: no {p.name} in {d} (a `bigbatch train` run directory)")
    try:
        summary_data = json.loads(summary.read_text())
        world = summary_data.get("world_size", 1)
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"--throughput-from: {summary} is not a JSON object") from None
    world = check_int_positive(f"--throughput-from: {summary.name} world_size", world)
    records = []
    lines = metrics.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything else is corruption.
            if i == len(lines):
                continue
            raise ValueError(f"--throughput-from: {metrics} line {i} is not valid JSON") from None
        if isinstance(r, dict) and r.get("kind") == "train" and isinstance(r.get("samples_per_s"), (int, float)):
            records.append(r)
    if not records:
        raise ValueError(f"--throughput-from: {metrics} has no 'train' records with samples_per_s")
    steady = [r for prev, r in zip([None] + records[:-1], records) if prev is not None and prev.get("batch_size") == r.get("batch_size")]
    used = steady or records
    per_gpu = statistics.median(float(r["samples_per_s"]) for r in used) / world
    if not (math.isfinite(per_gpu) and per_gpu > 0):
        raise ValueError(f"--throughput-from: {metrics} gives a non-positive throughput {per_gpu!r}")
    micro = summary_data.get("micro_batch_size")
    return per_gpu, {"run": str(d), "records": len(used), "world_size": world, "steady": bool(steady),
                     "micro_batch_size": micro if isinstance(micro, int) and micro > 0 else None}

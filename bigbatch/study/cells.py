"""Cells of a study: one ``bigbatch.train.train`` run per (batch size, LR multiplier, seed).

Each cell lives in ``cells/B<batch>_lr<mult>_s<seed>/``: ``cell.json`` (its TrainConfig and the
*attempt* token of the invocation that started it), ``run-<attempt>/`` (the trainer's own files
for that attempt), and ``result.json``. Only the study driver writes ``result.json``, atomically,
after a run finishes and only for the attempt it started itself, so its presence is what
"finished" means. A killed study leaves cells without ``result.json``; the next run starts those
from scratch under a new attempt token (they are short, and a restart cannot overshoot the step
budget the way resuming a ``max_steps`` run would). A worker that outlived its driver (it should
not: worker.py ties its life to the driver's) can therefore only write into its own stale
``run-<attempt>/`` directory, never into the files of a later run.

``python -m bigbatch.study.worker`` (worker.py) runs the cells it is sent and answers with their
records; the study starts one per GPU (``CUDA_VISIBLE_DEVICES``) or per CPU slot to run cells in
parallel. On a Ray cluster (ray_executor.py) a cell trains in a scratch directory of its worker
and its files come back to the driver, which writes them here before ``result.json``.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Cell", "run_cell", "read_result", "write_result", "new_attempt", "attempt_dir", "RESULT_FIELDS", "IGNORED_FOR_RESUME", "target_crossings"]

#: What a cell's result.json carries from the trainer's summary.json.
RESULT_FIELDS = (
    "reached_target",
    "steps_to_target",
    "samples_to_target",
    "final_metric",
    "best_metric",
    "steps",
    "samples",
    "stopped",
    "diverged",
    "wall_seconds",
    "lr",
    "device",
    "resolution",
    "dense_replays",
    "dense_replayed_steps",
)

#: TrainConfig fields that do not change a cell's outcome: a finished cell is reused across them.
#: ``record_targets`` only adds crossings to record: a cell serves a study whose easier targets
#: changed (target_crossings reads them from its evaluations, at the resolution they have there).
IGNORED_FOR_RESUME = ("out", "progress", "device", "resume", "overwrite", "record_targets", "stall_fraction", "nnodes", "node_rank",
                      "rdzv_endpoint")


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One point of the sweep."""

    batch_size: int
    lr_multiplier: float
    seed: int

    @property
    def name(self) -> str:
        return f"B{self.batch_size}_lr{self.lr_multiplier:g}_s{self.seed}"


def new_attempt() -> str:
    """A fresh attempt token: names the trainer's directory of one try at a cell."""
    return uuid.uuid4().hex[:12]


def attempt_dir(cell_dir: str | Path, attempt: str) -> Path:
    """Where the trainer writes its files for ``attempt`` of the cell in ``cell_dir``."""
    return Path(cell_dir) / f"run-{attempt}"


def run_cell(cell_dir: str | Path, workload: Any = None) -> dict[str, Any]:
    """Train the cell described by ``cell_dir/cell.json`` and return its result record.

    Writes nothing but the trainer's files under the attempt's ``run-<attempt>/``; the caller
    (the study driver) checks the record's ``attempt`` and writes it with ``write_result``.
    """
    from bigbatch.train import TrainConfig, train

    cell_dir = Path(cell_dir)
    spec = json.loads((cell_dir / "cell.json").read_text())
    cfg = TrainConfig.from_dict(spec["train"])
    summary = train(cfg, workload).summary
    record: dict[str, Any] = {**spec["cell"], "name": cell_dir.name, "attempt": spec.get("attempt")}
    record.update({k: summary.get(k) for k in RESULT_FIELDS})
    # The noise monitor's reading, when the trainer provides it (McCandlish et al. 2018, eq. 2.9).
    record["b_simple_median"] = summary.get("b_simple_median")
    record["b_simple_at_target"] = summary.get("b_simple_at_target")
    record["train"] = spec["train"]
    return record


def write_result(cell_dir: str | Path, record: dict[str, Any], attempt: str) -> None:
    """Write ``record`` as the cell's ``result.json``, if it comes from ``attempt``.

    Called by the study driver only. ``attempt`` is the token the driver wrote into
    ``cell.json`` when it started the cell; a record from any other attempt (a stray process
    of an earlier, killed study) is refused with ``RuntimeError`` rather than taken as this
    run's result.
    """
    from bigbatch.train.checkpoint import write_json_atomic

    if record.get("attempt") != attempt:
        raise RuntimeError(
            f"{cell_dir}: result of attempt {record.get('attempt')!r} is not the attempt {attempt!r} this study started"
        )
    write_json_atomic(record, Path(cell_dir) / "result.json")


def target_crossings(
    metrics: list[dict[str, Any]], targets: list[float], metric_name: str, higher_is_better: bool
) -> list[dict[str, Any]]:
    """For each target, when a run's evaluations first reached it, from its ``metrics.jsonl`` records.

    One entry per target, in the order given: ``target``, ``reached_target``,
    ``steps_to_target``, ``samples_to_target`` (of the first evaluation at or past it),
    ``b_simple_at_target`` — the noise monitor's last finite reading logged at or before that
    step, as the trainer itself reports for its one target — and ``resolution``: the samples
    since the evaluation before it, as a fraction of its samples (the crossing lies in that
    gap), with ``resolution_steps`` the same gap in steps. Evaluations are taken in the order
    written, which is the order of their steps (the trainer writes the dense evaluations of a
    replay before the evaluation that started it).
    """
    better = (lambda a, b: a >= b) if higher_is_better else (lambda a, b: a <= b)
    evals = [r for r in metrics if r.get("kind") == "eval" and r.get(metric_name) is not None]
    readings = []
    for r in metrics:
        if r.get("kind") == "train":
            b = r.get("b_simple_samples", r.get("b_simple"))
            if isinstance(b, (int, float)) and math.isfinite(b) and b > 0:
                readings.append((r["step"], float(b)))
    out = []
    for t in targets:
        i = next((i for i, r in enumerate(evals) if better(r[metric_name], t)), None)
        entry: dict[str, Any] = {"target": t, "reached_target": i is not None, "steps_to_target": None,
                                 "samples_to_target": None, "b_simple_at_target": None, "resolution": None,
                                 "resolution_steps": None}
        if i is not None:
            hit = evals[i]
            prev = evals[i - 1] if i > 0 else {"step": 0, "samples": 0}
            before = [b for step, b in readings if step <= hit["step"]]
            entry.update(steps_to_target=hit["step"], samples_to_target=hit["samples"],
                         b_simple_at_target=before[-1] if before else None,
                         resolution=(hit["samples"] - prev["samples"]) / hit["samples"] if hit["samples"] else 0.0,
                         resolution_steps=hit["step"] - prev["step"])
        out.append(entry)
    return out


def read_result(cell_dir: str | Path) -> dict[str, Any] | None:
    """A finished cell's record, or ``None`` if it has not finished."""
    p = Path(cell_dir) / "result.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:  # cannot happen with atomic writes, unless edited by hand
        return None

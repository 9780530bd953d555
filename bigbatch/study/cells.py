"""Cells of a study: one ``bigbatch.train.train`` run per (batch size, LR multiplier, seed).

Each cell lives in ``cells/B<batch>_lr<mult>_s<seed>/``: ``cell.json`` (its TrainConfig,
written before it starts), the trainer's own files, and ``result.json`` — written atomically
*after* the run finishes, so its presence is what "finished" means. A killed study leaves
cells without ``result.json``; the next run starts those from scratch (they are short, and a
restart cannot overshoot the step budget the way resuming a ``max_steps`` run would).

``python -m bigbatch.study.worker`` (worker.py) runs the cells it is sent; the study starts one
per GPU (``CUDA_VISIBLE_DEVICES``) or per CPU slot to run cells in parallel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Cell", "run_cell", "read_result", "RESULT_FIELDS", "IGNORED_FOR_RESUME"]

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
)

#: TrainConfig fields that do not change a cell's outcome: a finished cell is reused across them.
IGNORED_FOR_RESUME = ("out", "progress", "device", "resume", "overwrite")


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One point of the sweep."""

    batch_size: int
    lr_multiplier: float
    seed: int

    @property
    def name(self) -> str:
        return f"B{self.batch_size}_lr{self.lr_multiplier:g}_s{self.seed}"


def run_cell(cell_dir: str | Path, workload: Any = None) -> dict[str, Any]:
    """Train the cell described by ``cell_dir/cell.json``; write and return its result record."""
    from bigbatch.train import TrainConfig, train
    from bigbatch.train.checkpoint import write_json_atomic

    cell_dir = Path(cell_dir)
    spec = json.loads((cell_dir / "cell.json").read_text())
    cfg = TrainConfig.from_dict(spec["train"])
    summary = train(cfg, workload).summary
    record: dict[str, Any] = {**spec["cell"], "name": cell_dir.name}
    record.update({k: summary.get(k) for k in RESULT_FIELDS})
    # The noise monitor's reading, when the trainer provides it (McCandlish et al. 2018, eq. 2.9).
    record["b_simple_median"] = summary.get("b_simple_median")
    record["b_simple_at_target"] = summary.get("b_simple_at_target")
    record["train"] = spec["train"]
    write_json_atomic(record, cell_dir / "result.json")
    return record


def read_result(cell_dir: str | Path) -> dict[str, Any] | None:
    """A finished cell's record, or ``None`` if it has not finished."""
    p = Path(cell_dir) / "result.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:  # cannot happen with atomic writes, unless edited by hand
        return None

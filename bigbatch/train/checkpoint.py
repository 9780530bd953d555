"""Atomic checkpoints: write to a temporary file, then rename over the final name."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bigbatch import _files
from bigbatch.train.state import Checkpoint

__all__ = [
    "save_atomic", "list_checkpoints", "latest_checkpoint", "load_newest", "run_files", "remove_run", "rng_state",
    "set_rng_state", "write_json_atomic",
]

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a reader never sees a partial file (none is left on failure)."""
    _files.save_atomic(obj, path, name="checkpoint")


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """JSON to ``path`` atomically (tensors and numpy scalars as numbers)."""
    _files.write_json_atomic(obj, path, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints ``ckpt_<step>.pt`` in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``ckpt_<step>.pt`` by step, or None (whether it loads is not checked)."""
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}"


def load_newest(directory: str | Path, *, map_location: Any, report: Callable[[str], None]) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint in ``directory`` that loads, or None when there is none at all.

    A file that ``torch.load`` cannot read (truncated by a full disk, a copy cut short) is
    skipped and ``report``-ed with the reason, and the next older one is tried; a ValueError
    when none loads. A file that loads but is not a checkpoint of this format is an error,
    not skipped: it is not damage but a different program's or version's file.
    """
    paths = list_checkpoints(directory)
    if not paths:
        return None
    skipped: list[str] = []
    for path in reversed(paths):
        try:
            blob = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - whatever makes the file unreadable, an older one may do
            skipped.append(f"{path.name}: {_first_line(e)}")
            report(f"skipping checkpoint {path}: it does not load ({_first_line(e)})")
            continue
        return path, Checkpoint.from_dict(blob, where=str(path))
    raise ValueError(f"no checkpoint in {directory} loads ({'; '.join(skipped)})")


#: The files of a run in its ``out`` directory (besides ``checkpoints/ckpt_*.pt``).
_RUN_FILES = ("metrics.jsonl", "summary.json", "averaged.pt")


def run_files(out: str | Path) -> list[Path]:
    """The files in ``out`` that belong to a run: its checkpoints, metrics and summary."""
    out = Path(out)
    return list_checkpoints(out / "checkpoints") + [out / n for n in _RUN_FILES if (out / n).exists()]


def remove_run(out: str | Path) -> None:
    """Delete the run in ``out`` (what ``run_files`` lists); other files are left alone."""
    for p in run_files(out):
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Metrics: a JSONL file (one record per log step / evaluation) and a progress display."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from bigbatch._progress import Progress, format_value

__all__ = ["MetricsWriter", "ProgressDisplay", "read_metrics", "truncate_metrics"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (line-buffered so a crash loses at most a line)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._f: TextIO | None = open(self.path, "a", buffering=1) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Drop records written after ``max_step`` (a resumed run rewrites them)."""
    p = Path(path)
    if not p.exists():
        return
    keep = [json.dumps(r) for r in read_metrics(p) if r.get("step", 0) <= max_step]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(p)


class ProgressDisplay:
    """The trainer's progress: samples seen of the budget, with the latest readings.

    A rich bar on a terminal, a line every 5 s otherwise, or nothing (``bigbatch._progress``
    draws it, as it does the study's).
    """

    def __init__(self, mode: str, total_samples: int, title: str, enabled: bool = True) -> None:
        self._p = Progress(mode, title, total_samples, enabled=enabled)
        self.mode = self._p.mode
        self.total = total_samples
        self.title = title

    def update(self, samples: int, info: dict[str, Any], force: bool = False) -> None:
        """``samples`` seen so far; ``info`` (name → value, ``None`` skipped) shown beside it."""
        text = "  ".join(f"{k} {format_value(v)}" for k, v in info.items() if v is not None)
        self._p.update(samples, text)
        self._p.line(f"[{self.title}] samples {samples}/{self.total}  {text}", force=force)

    def close(self) -> None:
        self._p.close()

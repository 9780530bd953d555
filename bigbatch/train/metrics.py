"""Metrics: a JSONL file (one record per log step / evaluation) and a progress display."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

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
    """A rich progress bar on a terminal, plain lines otherwise, or nothing."""

    def __init__(self, mode: str, total_samples: int, title: str, enabled: bool = True) -> None:
        if mode not in ("auto", "bar", "lines", "none"):
            raise ValueError(f"progress must be auto, bar, lines or none, got {mode!r}")
        if not enabled:
            mode = "none"
        elif mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.total = total_samples
        self.title = title
        self._bar = None
        self._last_line = 0.0
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task(title, total=total_samples, info="")
            self._bar.start()

    def update(self, samples: int, info: dict[str, Any], force: bool = False) -> None:
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in info.items() if v is not None)
        if self._bar is not None:
            self._bar.update(self._task, completed=min(samples, self.total), info=text)
        elif self.mode == "lines":
            now = time.monotonic()
            if force or now - self._last_line >= 5.0:
                self._last_line = now
                print(f"[{self.title}] samples {samples}/{self.total}  {text}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)

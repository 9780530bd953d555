"""Progress of a study: cells done out of all, the cell just finished, and the time left."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["StudyProgress", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """``75`` → ``1m15s``; ``None`` → ``?``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class StudyProgress:
    """A rich bar on a terminal, one line per finished cell otherwise, or nothing.

    The time left is (cells left) × (wall-clock time of this invocation per cell finished in
    it), which accounts for cells running in parallel; cells skipped because they had finished
    earlier do not count, so a resumed study does not look instantaneous.

    ``open_ended``: more cells may still be added (LR-grid extensions); the count then reads
    ``[n/total+]`` and the time left covers only the cells known so far.
    """

    def __init__(self, mode: str, *, total: int, done: int, jobs: int, title: str, open_ended: bool = False) -> None:
        if mode not in ("auto", "bar", "lines", "none"):
            raise ValueError(f"progress must be auto, bar, lines or none, got {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.total, self.done, self.jobs = total, done, max(1, jobs)
        self.title = title
        self.open_ended = open_ended
        self._t0 = time.perf_counter()
        self._walls: list[float] = []
        self._bar = None
        if done and mode != "none":
            print(f"[study] {done}/{total}{'+' if open_ended else ''} cells already finished in this directory: skipped", flush=True)
        self._start_bar()

    def _start_bar(self) -> None:
        if self.mode == "bar" and self._bar is None and self.done < self.total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("cells"),
                TimeElapsedColumn(),
                TextColumn("left [cyan]{task.fields[eta]}"),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task(f"study {self.title}", total=self.total, completed=self.done, eta="?", info="")
            self._bar.start()

    def add_cells(self, n: int, *, done: int = 0) -> None:
        """``n`` more cells joined the study, ``done`` of them already finished (a resumed study)."""
        self.total += n
        self.done += done
        if self._bar is not None:
            self._bar.update(self._task, total=self.total, completed=self.done)
        else:
            self._start_bar()

    def eta(self) -> float | None:
        """Seconds left, or ``None`` before the first cell of this invocation finished."""
        if not self._walls:
            return None
        left = self.total - self.done
        elapsed = time.perf_counter() - self._t0
        per_cell = elapsed / len(self._walls)  # wall clock per finished cell, parallelism included
        return left * per_cell

    def cell_started(self, cell: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, info=f"running {cell.name}")

    def cell_done(self, record: dict[str, Any], metric_name: str) -> None:
        self.done += 1
        self._walls.append(float(record.get("wall_seconds") or 0.0))
        if record.get("reached_target"):
            what = f"{metric_name} target in {record['steps_to_target']} steps"
        else:
            what = f"not reached ({record.get('stopped')}, {metric_name} {_fmt(record.get('final_metric'))})"
        eta = format_duration(self.eta())
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, eta=eta, info=f"{record['name']}: {what}")
        elif self.mode == "lines":
            plus = "+" if self.open_ended else ""
            print(f"[{self.done}/{self.total}{plus}] {record['name']}: {what} ({record.get('wall_seconds', 0):.1f} s); ~{eta} left", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}"

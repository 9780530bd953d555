"""Progress of a study: cells done out of all, the cell just finished, and the time left.

Drawn by ``bigbatch._progress`` (the trainer's display uses the same code); this module
decides what a study shows.
"""

from __future__ import annotations

import time
from typing import Any

from bigbatch._progress import Progress, format_duration, format_value

__all__ = ["StudyProgress", "format_duration"]


class StudyProgress:
    """A rich bar on a terminal, one line per finished cell otherwise, or nothing.

    The time left is (cells left) × (wall-clock time of this invocation per cell finished in
    it), which accounts for cells running in parallel; cells skipped because they had finished
    earlier do not count, so a resumed study does not look instantaneous.

    ``open_ended``: more cells may still be added (LR-grid extensions); the count then reads
    ``[n/total+]`` and the time left covers only the cells known so far.
    """

    def __init__(self, mode: str, *, total: int, done: int, jobs: int, title: str, open_ended: bool = False) -> None:
        self.jobs = max(1, jobs)
        self.open_ended = open_ended
        self._t0 = time.perf_counter()
        self._walls: list[float] = []
        # The bar appears only while cells are left to run (a finished study shows none).
        self._p = Progress(mode, f"study {title}", total, completed=done, unit="cells", eta="given", start=False)
        self.mode = self._p.mode
        self.title = title
        if done:
            self._p.message(f"[study] {done}/{total}{self._plus} cells already finished in this directory: skipped")
        self._start_bar()

    @property
    def total(self) -> int:
        return self._p.total

    @property
    def done(self) -> int:
        return self._p.completed

    @property
    def _plus(self) -> str:
        return "+" if self.open_ended else ""

    def _start_bar(self) -> None:
        if self.done < self.total:
            self._p.start()

    def add_cells(self, n: int, *, done: int = 0) -> None:
        """``n`` more cells joined the study, ``done`` of them already finished (a resumed study)."""
        self._p.update(self.done + done, total=self.total + n)
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
        self._p.update(info=f"running {cell.name}")

    def cell_done(self, record: dict[str, Any], metric_name: str) -> None:
        self._walls.append(float(record.get("wall_seconds") or 0.0))
        if record.get("reached_target"):
            what = f"{metric_name} target in {record['steps_to_target']} steps"
        else:
            what = f"not reached ({record.get('stopped')}, {metric_name} {format_value(record.get('final_metric'))})"
        self._p.completed += 1
        eta = format_duration(self.eta())
        self._p.update(info=f"{record['name']}: {what}", eta=eta)
        self._p.line(f"[{self.done}/{self.total}{self._plus}] {record['name']}: {what} "
                     f"({record.get('wall_seconds') or 0:.1f} s); ~{eta} left", force=True)

    def note(self, text: str) -> None:
        """Say ``text`` once (in every mode but none), e.g. that a cell is started again."""
        self._p.message(f"[study] {text}")

    def close(self) -> None:
        self._p.close()

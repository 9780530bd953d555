"""The one progress display of bigbatch: a count towards a total, as a bar, as lines, or not at all.

Used by the trainer (``bigbatch.train.metrics.ProgressDisplay``: samples seen of the budget)
and by the study (``bigbatch.study.progress.StudyProgress``: cells done of the sweep). Each
says *what* to show; how it is shown — the mode rule, the rich bar, the plain lines and their
pacing, the number formats — lives here once.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress", "MODES", "resolve_mode", "format_duration", "format_value"]

#: Display modes: ``auto`` is a bar on a terminal and lines otherwise (a log file, CI).
MODES = ("auto", "bar", "lines", "none")


def resolve_mode(mode: str, enabled: bool = True) -> str:
    """``bar``, ``lines`` or ``none`` for the requested ``mode``; ``ValueError`` for an unknown one.

    ``enabled=False`` (e.g. a process other than rank 0) shows nothing whatever was asked.
    """
    if mode not in MODES:
        raise ValueError(f"progress must be auto, bar, lines or none, got {mode!r}")
    if not enabled:
        return "none"
    if mode == "auto":
        return "bar" if sys.stdout.isatty() else "lines"
    return mode


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


def format_value(v: Any) -> str:
    """A metric for a progress line: 4 significant digits, scientific when tiny or huge; ``n/a`` for None."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


class Progress:
    """A count ``completed`` of ``total`` shown as a rich bar, as plain lines, or not at all.

    ``eta``: ``"rich"`` lets the bar estimate the time left from its own rate (right when the
    count grows steadily, as samples do); ``"given"`` shows the text the caller passes to
    ``update(eta=...)`` (the study estimates it from cells finished in parallel). ``unit`` is
    written after the count (``12/48 cells``). The bar starts at once unless ``start=False``
    (then on ``start()``).

    In ``lines`` mode ``line(text)`` prints a line at most every ``line_every`` seconds, or
    always with ``force=True``; in the other modes it prints nothing (the bar shows the same).
    """

    def __init__(
        self,
        mode: str,
        title: str,
        total: int,
        *,
        completed: int = 0,
        unit: str = "",
        eta: str = "rich",
        enabled: bool = True,
        start: bool = True,
        line_every: float = 5.0,
    ) -> None:
        if eta not in ("rich", "given"):
            raise ValueError(f"eta must be 'rich' or 'given', got {eta!r}")
        self.mode = resolve_mode(mode, enabled)
        self.title = title
        self.total = total
        self.completed = completed
        self.unit = unit
        self.eta = eta
        self.line_every = line_every
        self._last_line = float("-inf")
        self._bar: Any = None
        self._task: Any = None
        if start:
            self.start()

    @property
    def active(self) -> bool:
        """True while a bar is on screen."""
        return self._bar is not None

    def start(self) -> None:
        """Put the bar on screen (``bar`` mode; nothing otherwise or when it already is)."""
        if self.mode != "bar" or self._bar is not None:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as RichProgress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
        if self.unit:
            columns.append(TextColumn(self.unit))
        columns.append(TimeElapsedColumn())
        if self.eta == "rich":
            columns.append(TimeRemainingColumn())
        else:
            columns.append(TextColumn("left [cyan]{task.fields[eta]}"))
        columns.append(TextColumn("{task.fields[info]}"))
        self._bar = RichProgress(*columns)
        self._task = self._bar.add_task(self.title, total=self.total, completed=self.completed, eta="?", info="")
        self._bar.start()

    def update(self, completed: int | None = None, info: str | None = None, *, total: int | None = None,
               eta: str | None = None) -> None:
        """New count, total, status text or time-left text (any of them); redraws the bar."""
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        if self._bar is None:
            return
        fields: dict[str, Any] = {"total": self.total, "completed": min(self.completed, self.total)}
        if info is not None:
            fields["info"] = info
        if eta is not None:
            fields["eta"] = eta
        self._bar.update(self._task, **fields)

    def line(self, text: str, *, force: bool = False) -> bool:
        """Print ``text`` as a line (``lines`` mode), paced by ``line_every`` unless ``force``; True if printed."""
        if self.mode != "lines":
            return False
        now = time.monotonic()
        if not force and now - self._last_line < self.line_every:
            return False
        self._last_line = now
        print(text, flush=True)
        return True

    def message(self, text: str) -> None:
        """Print ``text`` once, in every mode but ``none`` (e.g. what was skipped on resume)."""
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Take the bar off screen (safe to call twice)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

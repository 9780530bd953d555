"""The one progress display (bigbatch._progress), as the trainer and the study use it."""

import io

import pytest

from bigbatch import _progress
from bigbatch._progress import Progress, format_duration, format_value, resolve_mode
from bigbatch.study.cells import Cell
from bigbatch.study.progress import StudyProgress
from bigbatch.train.metrics import ProgressDisplay


def test_modes():
    assert resolve_mode("lines") == "lines" and resolve_mode("bar", enabled=False) == "none"
    assert resolve_mode("auto") in ("bar", "lines")
    with pytest.raises(ValueError, match="progress must be auto, bar, lines or none, got 'fancy'"):
        resolve_mode("fancy")
    for make in (lambda: ProgressDisplay("fancy", 10, "t"),
                 lambda: StudyProgress("fancy", total=1, done=0, jobs=1, title="t")):
        with pytest.raises(ValueError, match="progress must be"):
            make()


def test_formats():
    assert [format_duration(s) for s in (None, 5, 75, 3725)] == ["?", "5s", "1m15s", "1h02m"]
    assert [format_value(v) for v in (None, 0.12345, 1e-5, 123456.0, 7)] == ["n/a", "0.1235", "1e-05", "1.23e+05", "7"]


def test_trainer_lines_are_paced_and_forced(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(_progress.time, "monotonic", lambda: clock[0])
    p = ProgressDisplay("lines", 1000, "mnist1d")
    p.update(10, {"loss": 0.5, "acc": None})
    clock[0] += 1.0
    p.update(20, {"loss": 0.4})  # within 5 s of the last line: skipped
    p.update(30, {"loss": 0.3}, force=True)
    clock[0] += 5.0
    p.update(40, {"loss": 0.2})
    p.close()
    assert capsys.readouterr().out.splitlines() == [
        "[mnist1d] samples 10/1000  loss 0.5", "[mnist1d] samples 30/1000  loss 0.3", "[mnist1d] samples 40/1000  loss 0.2"]


def test_study_lines_one_per_cell(capsys):
    sp = StudyProgress("lines", total=3, done=1, jobs=2, title="linreg", open_ended=True)
    sp.cell_started(Cell(2, 1.0, 0))
    sp.cell_done({"name": "B2_lr1_s0", "reached_target": True, "steps_to_target": 17, "wall_seconds": 0.5}, "excess_loss")
    sp.cell_done({"name": "B4_lr1_s0", "reached_target": False, "stopped": "max_steps", "final_metric": 0.25,
                  "wall_seconds": 0.5}, "excess_loss")
    sp.add_cells(2, done=1)
    assert (sp.done, sp.total) == (4, 5)
    sp.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[study] 1/3+ cells already finished in this directory: skipped"
    assert lines[1].startswith("[2/3+] B2_lr1_s0: excess_loss target in 17 steps (0.5 s); ~")
    assert lines[2].startswith("[3/3+] B4_lr1_s0: not reached (max_steps, excess_loss 0.25) (0.5 s); ~0s left")


def test_none_and_disabled_print_nothing(capsys):
    ProgressDisplay("lines", 10, "t", enabled=False).update(5, {"loss": 1.0}, force=True)
    sp = StudyProgress("none", total=2, done=1, jobs=1, title="t")
    sp.cell_done({"name": "c", "reached_target": True, "steps_to_target": 1}, "m")
    assert capsys.readouterr().out == ""


def test_bar_mode_draws_through_the_shared_class(monkeypatch):
    """Both displays draw their bar with the one Progress class (a rich bar on a captured console)."""
    import rich.progress

    made = []
    real = rich.progress.Progress

    def recording(*columns, **kw):
        bar = real(*columns, console=rich.console.Console(file=io.StringIO(), force_terminal=True, width=200), **kw)
        made.append(bar)
        return bar

    monkeypatch.setattr(rich.progress, "Progress", recording)
    p = ProgressDisplay("bar", 100, "train")
    p.update(50, {"loss": 0.1})
    assert made[-1].tasks[0].completed == 50 and made[-1].tasks[0].fields["info"] == "loss 0.1"
    p.update(500, {})
    assert made[-1].tasks[0].completed == 100  # clamped to the total
    p.close()
    sp = StudyProgress("bar", total=2, done=0, jobs=1, title="s")
    sp.cell_done({"name": "c", "reached_target": True, "steps_to_target": 3, "wall_seconds": 1.0}, "m")
    assert made[-1].tasks[0].completed == 1 and "c: m target in 3 steps" in made[-1].tasks[0].fields["info"]
    assert made[-1].tasks[0].fields["eta"] != "?"
    sp.close()
    assert len(made) == 2
    done = StudyProgress("bar", total=2, done=2, jobs=1, title="s")  # nothing left to run: no bar
    assert len(made) == 2
    done.close()


def test_progress_class_direct():
    p = Progress("none", "x", 10)
    p.update(3, "info", total=20, eta="1s")
    assert (p.completed, p.total, p.active) == (3, 20, False)
    assert p.line("hello", force=True) is False
    with pytest.raises(ValueError, match="eta must be"):
        Progress("none", "x", 1, eta="soon")

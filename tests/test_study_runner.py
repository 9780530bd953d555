"""The study runner: outputs and schema, resuming after an interruption, config and CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.study import StudyConfig, run_study
from bigbatch.study import cells as cells_mod
from bigbatch.study.runner import plan_cells, resolve_study


def tiny(out, **kw):
    """A linear-regression study that runs in seconds."""
    base = dict(
        workload="linreg",
        workload_args={"dim": 4, "noise_std": 0.5},
        batch_sizes=[1, 2, 4, 8],
        lr=0.1,
        base_batch_size=8,
        rule="none",
        lr_grid=[0.5, 1.0],
        target=0.05,
        budget=600,
        budget_steps=300,
        eval_every_samples=1,
        eval_every_steps=1,
        jobs=1,
        bootstrap=50,
        progress="none",
        out=str(out),
        lr_extend=0,  # the grid only; the LR-grid extension has its own tests below
    )
    base.update(kw)
    return StudyConfig(**base)


def test_outputs_and_results_schema(tmp_path):
    res = run_study(tiny(tmp_path))
    for name in ("results.json", "report.html", "steps.png", "samples.png", "pareto.png", "best_lr.png", "study.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("b_crit", "b_crit_interval", "b_simple", "s_min", "e_min", "cells"):
        assert key in data
    assert data["complete"] is True
    assert len(data["cells"]) == 8 == data["cells_total"]
    for c in data["cells"]:
        assert {"batch_size", "lr_multiplier", "seed", "reached_target", "steps_to_target", "samples_to_target"} <= set(c)
        if c["reached_target"]:
            assert c["samples_to_target"] == c["steps_to_target"] * c["batch_size"]
    # Rule "none" keeps the LR fixed, so the steps stop falling at once (17, 10, 10, 14 at B = 1…8):
    # the raw fit puts B_crit near 0.4, below every measured batch size. That is no measurement,
    # so no number is given, with the reason (the determined case: test_study_undetermined.py).
    assert data["b_crit"] is None and data["b_crit_interval"] is None and data["s_min"] is None
    assert "outside the measured batch sizes" in data["b_crit_undetermined"]
    # Best LR per batch size: the reached multiplier with the fewest steps.
    for row in data["batch_sizes"]:
        mine = [c for c in data["cells"] if c["batch_size"] == row["batch_size"] and c["reached_target"]]
        if mine:
            assert row["steps"] == min(c["steps_to_target"] for c in mine)
    # B_simple: the median over the cells of each run's median noise-monitor reading.
    meds = sorted(c["b_simple_median"] for c in data["cells"] if c.get("b_simple_median") is not None) if any("b_simple_median" in c for c in data["cells"]) else None
    assert data["b_simple"] is not None and data["b_simple"] > 0
    if meds:
        assert meds[0] <= data["b_simple"] <= meds[-1]
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='http" not in html
    assert "The noise monitor measured B_simple" in html
    assert res["b_crit"] == data["b_crit"]


class Interrupt(RuntimeError):
    pass


def test_interrupted_study_resumes_without_recomputing(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    calls = []

    def dying(cell_dir, workload=None):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the 4th cell
        calls.append(str(cell_dir))
        return cells_mod.run_cell(cell_dir, workload)

    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, run_cell_fn=dying)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False and partial["cells_done"] == 3
    finished = sorted(p.parent for p in (tmp_path / "cells").glob("*/result.json"))
    assert [str(p) for p in finished] == sorted(calls)
    run_dir = lambda p: Path(json.loads((p / "result.json").read_text())["train"]["out"])  # noqa: E731
    before = {p: ((p / "result.json").stat().st_mtime_ns, (p / "result.json").read_bytes(),
                  (run_dir(p) / "summary.json").stat().st_mtime_ns) for p in finished}
    assert not list(tmp_path.rglob(".*.tmp*")), "a temporary file was left behind"

    rerun = []

    def spy(cell_dir, workload=None):
        rerun.append(str(cell_dir))
        return cells_mod.run_cell(cell_dir, workload)

    res = run_study(cfg, run_cell_fn=spy)
    assert len(rerun) == 5 and not set(rerun) & set(calls)
    for p, (mtime, content, smtime) in before.items():
        assert (p / "result.json").stat().st_mtime_ns == mtime
        assert (p / "result.json").read_bytes() == content
        assert (run_dir(p) / "summary.json").stat().st_mtime_ns == smtime  # not re-trained
    assert res["complete"] and res["cells_done"] == 8

    # A third run trains nothing and reproduces the same results.
    none = []
    res2 = run_study(cfg, run_cell_fn=lambda d, w=None: none.append(d))
    assert none == [] and res2["b_crit"] == res["b_crit"]


def test_rerun_with_other_settings_is_refused(tmp_path):
    cfg = tiny(tmp_path, batch_sizes=[2, 4], lr_grid=[1.0])
    run_study(cfg)
    with pytest.raises(ValueError, match="target"):
        run_study(cfg.replace(target=0.1))
    # More batch sizes extend the same study; only the new cells run.
    res = run_study(cfg.replace(batch_sizes=[2, 4, 8], progress="none"))
    assert res["cells_done"] == 3


def test_parallel_workers_match_in_process(tmp_path):
    a = run_study(tiny(tmp_path / "a", batch_sizes=[2, 4, 8], lr_grid=[1.0]))
    b = run_study(tiny(tmp_path / "b", batch_sizes=[2, 4, 8], lr_grid=[1.0], jobs=2))
    assert (tmp_path / "b" / "worker1.log").exists()  # two worker processes really ran
    steps = lambda r: sorted((c["name"], c["steps_to_target"]) for c in r["cells"])  # noqa: E731
    assert steps(a) == steps(b)
    assert (tmp_path / "b" / "worker0.log").exists()


def test_plan_and_resolve_defaults():
    from bigbatch.workloads import load_workload

    wl = load_workload("linreg")
    cfg = StudyConfig(workload="linreg", target=0.01).resolve()
    r = resolve_study(cfg, wl)
    assert r["base_batch_size"] == wl.defaults.batch_size and r["lr"] == wl.defaults.lr
    assert r["batch_sizes"] == sorted(r["batch_sizes"]) and wl.defaults.batch_size in r["batch_sizes"]
    cells = plan_cells(cfg, r)
    assert len(cells) == len(r["batch_sizes"]) * len(cfg.lr_grid) * len(cfg.seeds)
    assert cells[0].lr_multiplier == 1.0  # the rule's own LR runs first
    with pytest.raises(ValueError, match="--target is required"):
        resolve_study(StudyConfig(workload="linreg").resolve(), wl)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("batch_sizes", [0, 8], "batch_sizes"),
        ("lr_grid", [-1.0], "lr_grid"),
        ("seeds", [-1], "seeds"),
        ("rule", "linaer", "did you mean linear"),
        ("confidence", 1.0, "confidence"),
        ("jobs", -1, "jobs"),
        ("budget", 0, "budget"),
        ("device", "tpu", "device"),
        ("lr_extend", -1, "lr_extend"),
        ("lr_extend", 1.5, "lr_extend"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**{field: value}).resolve()


def test_toml_config(tmp_path):
    p = tmp_path / "study.toml"
    p.write_text('workload = "linreg"\nbatch_sizes = [4, 8]\nlr_grid = [1.0]\ntarget = 0.05\n[workload_args]\ndim = 4\n')
    cfg = StudyConfig.from_toml(p)
    assert cfg.batch_sizes == [4, 8] and cfg.workload_args == {"dim": 4}
    p.write_text("batch_size = 4\n")
    with pytest.raises(ValueError, match="unknown study config field"):
        StudyConfig.from_toml(p)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bigbatch", "study", *args], capture_output=True, text=True)


def _cli_in_process(capsys, *args):
    """``bigbatch study ARGS`` through the real entry point, without paying a new interpreter."""
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", *args])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_cli_bad_input_one_line_exit_2_subprocess(tmp_path):
    r = _cli("--batch-sizes", "0,abc", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --batch-sizes must be"), r.stderr


@pytest.mark.parametrize(
    "args,match",
    [
        (["--batch-sizes", "16,-4"], "--batch-sizes must be"),
        (["--lr-grid", "1,x"], "--lr-grid must be"),
        (["--seeds", "-1"], "--seeds must be"),
        (["--rule", "linaer"], "did you mean linear"),
        (["--confidence", "2"], "confidence must be in"),
        (["--lr-extend", "-1"], "lr_extend (--lr-extend) must be an integer >= 0, got -1"),
        (["--config", "/nonexistent/study.toml"], "No such file"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, args, match):
    code, _, err = _cli_in_process(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


def test_cli_runs_from_toml(tmp_path, capsys):
    p = tmp_path / "study.toml"
    p.write_text(
        'workload = "linreg"\nbatch_sizes = [2, 4, 8]\nlr_grid = [1.0]\nlr = 0.1\nbase_batch_size = 8\nrule = "none"\n'
        "target = 0.05\nbudget = 600\neval_every_samples = 1\neval_every_steps = 1\njobs = 1\nbootstrap = 50\n"
        '[workload_args]\ndim = 4\nnoise_std = 0.5\n'
    )
    code, out, err = _cli_in_process(capsys, "--config", str(p), "--out", str(tmp_path / "o"), "--progress", "lines")
    assert code in (0, None), err
    assert "B_crit" in out and "report:" in out
    assert "[3/3]" in out
    # The rich bar (what a terminal shows) over more cells of the same study.
    code, out, err = _cli_in_process(capsys, "--config", str(p), "--out", str(tmp_path / "o"), "--progress", "bar",
                                     "--batch-sizes", "2,4,8,16")
    assert code in (0, None), err
    assert "3/4 cells already finished" in out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["cells_done"] == 4


def test_killed_cli_study_resumes_without_recomputing(tmp_path):
    """SIGKILL the real command after two cells; the re-run trains only the rest."""
    import os
    import signal
    import time

    out = tmp_path / "o"
    args = [sys.executable, "-m", "bigbatch", "study", "--workload", "linreg", "-w", "dim=4", "-w", "noise_std=0.5",
            "--batch-sizes", "1,2,4,8", "--lr-grid", "0.5,1", "--lr", "0.1", "--base-batch-size", "8", "--rule", "none",
            "--target", "0.05", "--budget", "600", "--budget-steps", "300", "--eval-every-samples", "1",
            "--eval-every-steps", "1", "--lr-extend", "0", "--jobs", "1", "--bootstrap", "50", "--progress", "none", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("cells/*/result.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    assert 2 <= len(done) < 8
    rerun = []

    def spy(cell_dir, workload=None):
        rerun.append(os.path.basename(cell_dir))
        return cells_mod.run_cell(cell_dir, workload)

    res = run_study(tiny(out), run_cell_fn=spy)
    assert res["complete"] and len(rerun) == 8 - len(done) and not set(rerun) & set(done)
    assert {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in done} == done


def test_every_cli_flag_mirrors_a_config_field():
    import dataclasses
    import inspect

    from bigbatch.cli.study import study_command

    flags = set(inspect.signature(study_command).parameters) - {"config"}
    flags = {"workload_args" if f == "workload_arg" else f for f in flags}
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    assert flags == fields
    lines = inspect.getsource(StudyConfig).splitlines()
    for f in dataclasses.fields(StudyConfig):  # a docstring per field, as the style guide asks
        i = next(k for k, line in enumerate(lines) if line.startswith(f"    {f.name}:"))
        assert lines[i + 1].strip().startswith('"""'), f"field {f.name} has no docstring"


def test_failed_cell_stops_the_study_and_keeps_finished_results(tmp_path):
    cfg = tiny(tmp_path, batch_sizes=[2, 4, 8], lr_grid=[1.0])
    n = []

    def oom_on_third(cell_dir, workload=None):
        n.append(cell_dir)
        if len(n) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return cells_mod.run_cell(cell_dir, workload)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_study(cfg, run_cell_fn=oom_on_third)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False and data["cells_done"] == 2
    assert run_study(cfg)["complete"]


# LR-grid extension. On this linreg study (measured, deterministic on CPU) the steps to target are
#   B=1: x0.5 19, x1 17, x2 15, x4 not reached (max_steps)
#   B=4: x0.5 27, x1 10, x2 5, x4 10
# so the grid [0.5, 1] has its best at the top edge at both batch sizes.

def _rows(res):
    return {row["batch_size"]: row for row in res["batch_sizes"]}


def test_lr_extension_moves_the_best_inside(tmp_path, capsys):
    res = run_study(tiny(tmp_path, batch_sizes=[1, 4], lr_extend=2, progress="lines"))
    rows = _rows(res)
    # B=4: x2 beat x1 (still the edge), so x4 ran; it is slower: x2 is interior.
    assert rows[4]["lr_multipliers_tried"] == [0.5, 1.0, 2.0, 4.0] and rows[4]["lr_extensions"] == [2.0, 4.0]
    assert rows[4]["best_lr_multiplier"] == 2.0 and rows[4]["steps"] == 5 and not rows[4]["best_at_grid_edge"]
    # B=1: x4 did not reach the target, which ends the search with x2 interior.
    assert rows[1]["lr_extensions"] == [2.0, 4.0] and rows[1]["best_lr_multiplier"] == 2.0
    assert not rows[1]["best_at_grid_edge"]
    names = sorted(c["name"] for c in res["cells"])
    assert names == sorted(f"B{b}_lr{m:g}_s0" for b in (1, 4) for m in (0.5, 1, 2, 4))  # no x8, no x0.25
    assert {c["name"] for c in res["cells"] if c["lr_extension"]} == {"B1_lr2_s0", "B1_lr4_s0", "B4_lr2_s0", "B4_lr4_s0"}
    assert res["complete"] and res["cells_done"] == res["cells_total"] == 8
    assert not any("edge" in n for n in res["notes"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert _rows(data)[4]["lr_extensions"] == [2.0, 4.0]
    assert "<td>0.5, 1, <b>2</b>, <b>4</b></td>" in (tmp_path / "report.html").read_text()
    # Progress: the count says more cells may come, and ends at the grown total.
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert lines[0].startswith("[1/4+]") and lines[-1].startswith("[8/8+]") and len(lines) == 8


def test_lr_extension_limit_is_named_in_the_note(tmp_path):
    res = run_study(tiny(tmp_path, batch_sizes=[4], lr_extend=1))
    row = _rows(res)[4]
    assert row["lr_multipliers_tried"] == [0.5, 1.0, 2.0] and row["best_lr_multiplier"] == 2.0
    assert row["best_at_grid_edge"]
    assert any("at B=4 the best LR is still at the edge after 1 extension(s)" in n and "--lr-extend 1" in n
               for n in res["notes"]), res["notes"]


def test_cli_lr_extend(tmp_path, capsys):
    code, out, err = _cli_in_process(
        capsys, "--workload", "linreg", "-w", "dim=4", "-w", "noise_std=0.5", "--batch-sizes", "4", "--lr-grid", "0.5,1",
        "--lr", "0.1", "--base-batch-size", "8", "--rule", "none", "--target", "0.05", "--budget", "600",
        "--budget-steps", "300", "--eval-every-samples", "1", "--eval-every-steps", "1", "--jobs", "1",
        "--bootstrap", "50", "--progress", "none", "--lr-extend", "1", "--out", str(tmp_path / "o"))
    assert code in (0, None), err
    assert "lr grid extended where its best was at the edge: B=4 x2" in out
    assert "note: at B=4 the best LR is still at the edge after 1 extension(s)" in out
    assert json.loads((tmp_path / "o" / "study.json").read_text())["config"]["lr_extend"] == 1


def test_lr_extend_0_is_the_grid_only(tmp_path):
    cfg = tiny(tmp_path, batch_sizes=[1, 4], lr_extend=0)
    res = run_study(cfg)
    planned = plan_cells(cfg.replace().resolve(), res["resolved"])
    assert [c["name"] for c in res["cells"]] == [c.name for c in planned]
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == sorted(c.name for c in planned)
    assert _rows(res)[4]["best_lr_multiplier"] == 1.0 and _rows(res)[4]["lr_extensions"] == []
    assert "at B=4 the best LR is at the edge of --lr-grid: the true best LR may lie outside it" in res["notes"]


def test_interrupted_lr_extension_resumes_to_the_same_result(tmp_path):
    cfg = tiny(tmp_path / "r", batch_sizes=[1, 2, 4], lr_extend=2)
    calls = []

    def dying(cell_dir, workload=None):
        if len(calls) == 8:  # Ctrl-C in the 9th cell (6 planned ones and the extensions)
            raise KeyboardInterrupt
        calls.append(os.path.basename(cell_dir))
        return cells_mod.run_cell(cell_dir, workload)

    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, run_cell_fn=dying)
    partial = json.loads((tmp_path / "r" / "results.json").read_text())
    assert partial["complete"] is False and partial["cells_done"] == 8
    extended = [c["name"] for c in partial["cells"] if c["lr_extension"]]
    # A batch size's extensions are queued first as soon as its cells are in: B=1's two ran, and
    # B=2's first, before the last planned cell (B=4 at x0.5).
    assert extended == ["B1_lr2_s0", "B1_lr4_s0", "B2_lr2_s0"]
    assert "B4_lr0.5_s0" not in calls
    mtimes = {n: (tmp_path / "r" / "cells" / n / "result.json").stat().st_mtime_ns for n in calls}

    rerun = []

    def spy(cell_dir, workload=None):
        rerun.append(os.path.basename(cell_dir))
        return cells_mod.run_cell(cell_dir, workload)

    res = run_study(cfg, run_cell_fn=spy)
    assert rerun and not set(rerun) & set(calls)  # finished extension cells are not re-trained
    assert {n: (tmp_path / "r" / "cells" / n / "result.json").stat().st_mtime_ns for n in calls} == mtimes
    assert set(extended) <= {c["name"] for c in res["cells"] if c["lr_extension"]}  # nor lost
    assert res["complete"] and len(calls) + len(rerun) == res["cells_total"] > 8

    # The same study uninterrupted (in two worker processes) ends with the same result.
    ref = run_study(cfg.replace(out=str(tmp_path / "u"), jobs=2))
    steps = lambda r: sorted((c["name"], c["steps_to_target"]) for c in r["cells"])  # noqa: E731
    assert steps(res) == steps(ref)
    best = lambda r: [(w["batch_size"], w["best_lr_multiplier"], w["steps"], w["lr_extensions"]) for w in r["batch_sizes"]]  # noqa: E731
    assert best(res) == best(ref) and res["notes"] == ref["notes"] and res["b_crit"] == ref["b_crit"]

    # A third run trains nothing.
    none = []
    res3 = run_study(cfg, run_cell_fn=lambda d, w=None: none.append(d))
    assert none == [] and res3["cells_done"] == res["cells_done"] and best(res3) == best(res)

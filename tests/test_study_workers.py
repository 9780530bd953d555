"""Study workers die with their driver, and nothing a stray worker writes reaches a later run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.study import StudyConfig, run_study
from bigbatch.study import cells as cells_mod

# Cells that do not reach the target and run 200 steps each: long enough (seconds) that the
# driver is killed while its workers are in the middle of them.
ARGS = ["--workload", "linreg", "-w", "dim=4", "-w", "noise_std=0.5", "--batch-sizes", "2,4", "--lr-grid", "1",
        "--lr", "0.1", "--base-batch-size", "8", "--rule", "none", "--target", "0.0001", "--budget", "100000",
        "--budget-steps", "200", "--eval-every-samples", "1000", "--eval-every-steps", "100", "--lr-extend", "0",
        "--bootstrap", "50", "--progress", "none"]


def same_config(out, **kw):
    base = dict(workload="linreg", workload_args={"dim": 4, "noise_std": 0.5}, batch_sizes=[2, 4], lr_grid=[1.0],
                lr=0.1, base_batch_size=8, rule="none", target=0.0001, budget=100000, budget_steps=200,
                eval_every_samples=1000, eval_every_steps=100, lr_extend=0, bootstrap=50, progress="none", out=str(out))
    base.update(kw)
    return StudyConfig(**base)


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``BIGBATCH_TEST_TAG=tag`` (zombies excluded)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"BIGBATCH_TEST_TAG={tag}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:  # gone, or not ours
            continue
        found.append(int(d.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_driver_takes_its_workers_along(tmp_path):
    out = tmp_path / "o"
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "BIGBATCH_TEST_TAG": tag}
    proc = subprocess.Popen([sys.executable, "-m", "bigbatch", "study", *ARGS, "--jobs", "2", "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        # Both workers are training: each cell's attempt directory has the trainer's metrics file.
        while len(list((out / "cells").rglob("metrics.jsonl"))) < 2:
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        workers = [p for p in tagged_processes(tag) if p != proc.pid]
        assert len(workers) == 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    t0 = time.monotonic()
    while tagged_processes(tag) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    left = tagged_processes(tag)
    for pid in left:  # leave no strays behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert left == [], "study workers outlived the killed driver"
    # A cell may have finished before the kill (the driver wrote its result): it is reused below.
    finished = {p.parent.name for p in out.glob("cells/*/result.json")}
    stale = {p.parent.name: p.name for p in out.glob("cells/*/run-*") if p.parent.name not in finished}

    res = run_study(same_config(out, jobs=1))
    assert res["complete"] and res["cells_done"] == 2
    for name in ("B2_lr1_s0", "B4_lr1_s0"):
        cell = out / "cells" / name
        record = json.loads((cell / "result.json").read_text())
        spec = json.loads((cell / "cell.json").read_text())
        assert record["attempt"] == spec["attempt"] and record["steps"] == 200
        assert [p.name for p in cell.glob("run-*")] == [f"run-{record['attempt']}"]
        assert stale.get(name) != f"run-{record['attempt']}"  # an unfinished cell ran again, afresh


def test_worker_exits_when_its_lifeline_closes(tmp_path):
    """The portable half (every platform): a worker whose driver's pipe end closes exits at once."""
    r, w = os.pipe()
    code = ("import sys, time; from bigbatch.study.worker import watch_lifeline; "
            f"watch_lifeline({r}); print('armed', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=(r,), stdout=subprocess.PIPE, text=True)
    os.close(r)
    try:
        assert child.stdout.readline().strip() == "armed"
        assert child.poll() is None
        os.close(w)  # what the driver's death does
        assert child.wait(timeout=5) == 3
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_worker_started_after_its_parent_died_exits():
    """A worker whose driver died before it armed the death signal is already an orphan: it exits."""
    code = "from bigbatch.study.worker import die_with_parent; die_with_parent(1, None); print('still here')"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert child.returncode == 3 and "still here" not in child.stdout


def test_a_stray_record_is_never_taken_as_a_later_runs_result(tmp_path):
    """A record from an attempt the study did not start (a stray worker of a killed study) is refused."""
    cell = tmp_path / "cells" / "B2_lr1_s0"
    cell.mkdir(parents=True)
    record = {"name": cell.name, "attempt": "old", "reached_target": True, "steps_to_target": 1}
    with pytest.raises(RuntimeError, match="attempt 'old' is not the attempt 'new'"):
        cells_mod.write_result(cell, record, "new")
    assert not (cell / "result.json").exists()
    cells_mod.write_result(cell, {**record, "attempt": "new"}, "new")
    assert json.loads((cell / "result.json").read_text())["attempt"] == "new"


def test_cells_run_in_their_attempt_directory_and_only_the_driver_writes_results(tmp_path, monkeypatch):
    """A worker answers with its record and writes only under run-<attempt>/; stale attempts are cleared."""
    out = tmp_path / "s"
    stale = out / "cells" / "B2_lr1_s0" / "run-deadbeef"
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text("{}\n")
    seen = []

    def spy(cell_dir, workload=None):
        record = cells_mod.run_cell(cell_dir, workload)
        seen.append((Path(cell_dir), (Path(cell_dir) / "result.json").exists()))
        return record

    res = run_study(same_config(out, jobs=1, budget_steps=20), run_cell_fn=spy)
    assert res["complete"]
    assert [written for _, written in seen] == [False, False]  # run_cell itself wrote no result
    assert not stale.exists()
    for cell_dir, _ in seen:
        record = json.loads((cell_dir / "result.json").read_text())
        assert Path(record["train"]["out"]) == cell_dir / f"run-{record['attempt']}"
        assert (cell_dir / f"run-{record['attempt']}" / "summary.json").exists()


def test_a_second_study_on_the_same_directory_is_refused(tmp_path):
    """Two drivers on one --out would train the same cells into each other's files."""
    from bigbatch.study.runner import study_lock

    out = tmp_path / "s"
    (out / "cells").mkdir(parents=True)
    with study_lock(out):
        with pytest.raises(ValueError, match=r"another bigbatch study \(pid \d+\) is running in --out"):
            run_study(same_config(out, jobs=1, budget_steps=5))
    assert run_study(same_config(out, jobs=1, budget_steps=5))["complete"]  # released: the next one runs

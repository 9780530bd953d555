"""``bigbatch study --executor ray`` on a local Ray instance: the same cells and fit as the local
executor, a worker killed mid-cell is retried and its cell recorded once, a re-run skips every cell;
and ``bigbatch train`` across two "nodes" launched on Ray (examples/ray_train_nodes.py).

One ``ray.init`` for the module (starting Ray takes seconds); skipped where Ray is not installed.
"""

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from bigbatch.study import StudyConfig, run_study  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # The workers are started by this process's Ray instance and inherit its environment: they
    # import bigbatch and this directory's fault workload from the same places.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(TESTS), old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def mnist1d(out, **kw):
    """Four MNIST-1D cells (an MLP on 2000 examples) whose fit determines B_crit; seconds per cell."""
    base = dict(workload="mnist1d", workload_args={"model": "mlp", "num_samples": 2000}, batch_sizes=[16, 32, 64, 256],
                lr_grid=[1.0], lr=0.1, target=0.3, budget=40_000, budget_steps=150, eval_every_samples=32,
                eval_every_steps=2, lr_extend=0, bootstrap=50, progress="none", device="cpu", out=str(out))
    base.update(kw)
    return StudyConfig(**base)


CELL_KEYS = ("name", "batch_size", "lr_multiplier", "seed", "reached_target", "steps_to_target", "samples_to_target",
             "final_metric", "best_metric", "steps", "samples", "stopped", "b_simple_median", "b_simple_at_target")
FIT_KEYS = ("b_crit", "b_crit_interval", "b_crit_undetermined", "s_min", "e_min", "b_noise", "b_simple", "cells_done")


def test_ray_cells_and_fit_equal_the_local_executors(tmp_path):
    local = run_study(mnist1d(tmp_path / "local", jobs=1))
    remote = run_study(mnist1d(tmp_path / "ray", executor="ray"))
    assert remote["complete"] and remote["cells_done"] == 4
    by_name = lambda res: {c["name"]: {k: c.get(k) for k in CELL_KEYS} for c in res["cells"]}  # noqa: E731
    assert by_name(remote) == by_name(local)
    assert {k: remote[k] for k in FIT_KEYS} == {k: local[k] for k in FIT_KEYS}
    assert remote["b_crit"] is not None  # a real fit is compared, not two "undetermined"
    # The cells' files came back to the driver's study directory, with the driver's paths in them.
    for c in remote["cells"]:
        run_dir = Path(c["train"]["out"])
        assert run_dir.parent == tmp_path / "ray" / "cells" / c["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["config"]["out"] == str(run_dir) and summary["steps"] == c["steps"]
        local_metrics = (tmp_path / "local" / "cells" / c["name"]).glob("run-*/metrics.jsonl")
        strip = lambda p: [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k  # noqa: E731
                            and "wall" not in k} for line in p.read_text().splitlines()]
        assert strip(run_dir / "metrics.jsonl") == strip(next(local_metrics))


def linreg_faulty(out, marker, **kw):
    base = dict(workload="_ray_faults:linreg_dies_once",
                workload_args={"marker": str(marker), "driver_pid": os.getpid(), "dim": 4, "noise_std": 0.5},
                batch_sizes=[2, 4], lr_grid=[0.5, 1.0], lr=0.1, base_batch_size=8, rule="none", target=0.05,
                budget=600, budget_steps=300, eval_every_samples=1, eval_every_steps=1, lr_extend=0, bootstrap=50,
                progress="lines", device="cpu", executor="ray", out=str(out))
    base.update(kw)
    return StudyConfig(**base)


def test_killed_worker_is_retried_cell_recorded_once_rerun_skips_all(tmp_path, capsys):
    marker = tmp_path / "killed"
    out = tmp_path / "o"
    res = run_study(linreg_faulty(out, marker))
    shown = capsys.readouterr().out
    # One worker process died mid-cell (SIGKILL from inside the cell, as a crash or a preemption).
    pid = int(marker.read_text())
    assert pid != os.getpid() and not Path(f"/proc/{pid}").exists()
    assert shown.count("its Ray worker died") == 1 and "starting it again (1/2)" in shown
    assert res["complete"] and res["cells_done"] == 4 == len(res["cells"])
    assert sorted(c["name"] for c in res["cells"]) == ["B2_lr0.5_s0", "B2_lr1_s0", "B4_lr0.5_s0", "B4_lr1_s0"]
    done_lines = [line for line in shown.splitlines() if line.startswith("[") and "/4]" in line]
    assert len(done_lines) == 4, shown  # each cell counted once, the retried one included
    for c in res["cells"]:
        cell = out / "cells" / c["name"]
        assert [p.name for p in cell.glob("run-*")] == [f"run-{c['attempt']}"]
        assert json.loads((cell / "result.json").read_text())["attempt"] == c["attempt"]
    # The retried cell trained from scratch to the same result as a run that was never killed.
    clean = run_study(linreg_faulty(tmp_path / "clean", marker, progress="none"))
    steps = lambda r: sorted((c["name"], c["steps_to_target"], c["final_metric"]) for c in r["cells"])  # noqa: E731
    assert steps(clean) == steps(res)

    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    again = run_study(linreg_faulty(out, marker))
    shown = capsys.readouterr().out
    assert "4/4 cells already finished in this directory: skipped" in shown and "/4] " not in shown
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")} == before
    assert again["cells_done"] == 4 and [c["name"] for c in again["cells"]] == [c["name"] for c in res["cells"]]


def _workers(out):
    return [json.loads(line) for line in (out / "ray-workers.jsonl").read_text().splitlines()]


def test_workers_live_across_cells_and_a_leaking_one_is_replaced(tmp_path, capsys):
    from bigbatch.study.ray_executor import LEAK_TOLERANCE_BYTES

    # Four cells on two slots (num_cpus=2, one CPU a cell): two worker processes run all four.
    res = run_study(linreg_faulty(tmp_path / "reuse", tmp_path / "m", workload="linreg",
                                  workload_args={"dim": 4, "noise_std": 0.5}, progress="none"))
    log = _workers(tmp_path / "reuse")
    assert res["complete"] and len(log) == 4 and sorted(e["cell"] for e in log) == sorted(c["name"] for c in res["cells"])
    assert len({e["pid"] for e in log}) <= 2 and not any(e["replaced"] for e in log)
    assert all(e["leaked_bytes"] <= LEAK_TOLERANCE_BYTES for e in log)
    # A workload that keeps 96 MiB per cell alive: each worker's second cell shows it, that worker
    # is replaced, and the cells' results are those of the clean workload.
    capsys.readouterr()
    leaky = run_study(linreg_faulty(tmp_path / "leak", tmp_path / "m", workload="_ray_faults:linreg_leaks",
                                    workload_args={"mib": 96, "dim": 4, "noise_std": 0.5}))
    shown = capsys.readouterr().out
    log = _workers(tmp_path / "leak")
    replaced = [e for e in log if e["replaced"]]
    assert leaky["complete"] and replaced and all(e["leaked_bytes"] >= 96 * 2**20 for e in replaced)
    assert shown.count("more than after its first cell; replaced it with a fresh one") == len(replaced)
    same = lambda r: sorted((c["name"], c["steps_to_target"], c["final_metric"]) for c in r["cells"])  # noqa: E731
    assert same(leaky) == same(res)


@pytest.mark.parametrize("kw,match", [
    (dict(device="cuda"), "device cuda was asked for but the Ray cluster has no GPUs"),
    (dict(device="cuda:1"), "names one GPU of this host"),
    (dict(ray_cpus_per_cell=0.0), "ray_cpus_per_cell must be > 0 for cells on CPUs"),
    (dict(ray_address="127.0.0.1:6379"), "already connected to a Ray cluster"),
])
def test_cells_the_cluster_cannot_run_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_study(mnist1d(tmp_path, executor="ray", **kw))
    assert ray.is_initialized()  # a Ray instance the study did not start is left running


def test_multinode_training_launched_on_ray(tmp_path):
    """examples/ray_train_nodes.py on this Ray instance: two "nodes" (SPREAD: they may share the host)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "ray_train_nodes.py"), "--nodes", "2", "--strategy", "SPREAD",
           "--address", ray.get_runtime_context().gcs_address, "--port", str(_free_port()), "--",
           "--workload", "linreg", "-w", "dim=16", "--batch-size", "32", "--lr", "0.05", "--optimizer", "sgd",
           "--budget-samples", str(32 * 12), "--progress", "none", "--device", "cpu", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_a_one_line_error(tmp_path, capsys):
    import socket

    from bigbatch.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The study connects by itself only when no Ray runs in this process: this test comes last.
    ray.shutdown()
    with pytest.raises(SystemExit) as e:
        main(["study", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there"), err

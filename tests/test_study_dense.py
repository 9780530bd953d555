"""The study with dense evaluation (resolution per crossing), the worker plan and the timing record."""

import json

import pytest

from bigbatch.study import StudyConfig, run_study
from bigbatch.study import executors, runner
from bigbatch.study.cells import run_cell
from bigbatch.study.executors import InProcessExecutor, worker_env
from bigbatch.study.runner import plan_workers

# test_dense_eval.Ramp: the metric falls by exactly 1/64 a step at any batch size (LR 1/64, rule none).
K_EASY, K_HARD = 130, 337
TARGETS = [100 - K_EASY / 64, 100 - K_HARD / 64]


def ramp_study(out, **kw):
    base = dict(workload="test_dense_eval:Ramp", batch_sizes=[8, 16, 32], lr=1 / 64, base_batch_size=8, rule="none",
                optimizer="sgd", momentum=0.0, lr_grid=[1.0], lr_extend=0, targets=TARGETS, budget=64 * 1000,
                budget_steps=1000, eval_every_samples=8, eval_every_steps=100, jobs=1, bootstrap=50, progress="none",
                out=str(out), device="cpu")
    base.update(kw)
    return run_study(StudyConfig(**base))


def test_every_crossing_is_located_to_two_percent(tmp_path):
    res = ramp_study(tmp_path / "dense")
    for cell in res["cells"]:
        for e, k in zip(cell["by_target"], (K_EASY, K_HARD)):
            assert k <= e["steps_to_target"] <= 1.02 * k and e["resolution"] <= 0.02
        assert cell["resolution"] <= 0.02 and cell["dense_replays"] == 2
    assert not any("known only to within" in n for n in res["notes"])
    for entry in res["by_target"]:
        assert entry["resolution_max"] <= 0.02
        # S(B) is flat (the ramp moves 1/64 a step at every B): no bend, so no B_crit, and a reason.
        assert entry["b_crit"] is None and entry["b_crit_undetermined"]
    t = res["timing"]
    assert t["cells"] == 3 and t["cells_per_hour"] > 0 and t["workers"] == 1 and t["cells_per_gpu"] is None


def test_without_dense_evaluation_the_coarse_crossings_are_a_note(tmp_path):
    res = ramp_study(tmp_path / "coarse", target_resolution=0)
    for cell in res["cells"]:
        # evaluations every 100 steps: 200 and 400, off by 54% and 19%
        assert [e["steps_to_target"] for e in cell["by_target"]] == [200, 400]
        assert cell["by_target"][0]["resolution"] == pytest.approx(1 / 2)
    assert any("known only to within one evaluation interval: up to 50%" in n for n in res["notes"])


def test_worker_plan(monkeypatch):
    gpus = ["0", "1", "2"]
    assert plan_workers(StudyConfig(), gpus, 16) == (3, 1)
    assert plan_workers(StudyConfig(cells_per_gpu=4), gpus, 16) == (12, 4)
    assert plan_workers(StudyConfig(jobs=2), gpus, 16) == (2, None)
    assert plan_workers(StudyConfig(), [], 2) == (2, None) and plan_workers(StudyConfig(jobs=1), [], 16) == (1, None)
    monkeypatch.setitem(runner.PRESETS, "mnist1d", {**runner.PRESETS["mnist1d"], "cells_per_gpu": 3})
    assert plan_workers(StudyConfig(), gpus[:1], 16) == (3, 3)  # the workload's preset
    assert plan_workers(StudyConfig(cells_per_gpu=2), gpus[:1], 16) == (2, 2)  # the flag wins
    with pytest.raises(ValueError, match=r"cells_per_gpu \(--cells-per-gpu\) applies to --device cuda"):
        plan_workers(StudyConfig(cells_per_gpu=2), [], 16)
    with pytest.raises(ValueError, match="jobs and cells_per_gpu were both given"):
        StudyConfig(jobs=2, cells_per_gpu=2).resolve()
    with pytest.raises(ValueError, match="cells_per_gpu must be a positive integer"):
        StudyConfig(cells_per_gpu=0).resolve()
    # Worker slots take the GPUs in turn: cells_per_gpu workers see each GPU.
    envs = [worker_env(slot, gpus, 4) for slot in range(12)]
    seen = [e["CUDA_VISIBLE_DEVICES"] for e in envs]
    assert sorted(seen) == sorted(gpus * 4) and all(e["OMP_NUM_THREADS"] == "4" for e in envs)


def test_cells_per_gpu_on_a_cpu_study_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"applies to --device cuda"):
        ramp_study(tmp_path / "x", cells_per_gpu=2, jobs=0)


def test_cells_per_gpu_with_fake_gpus_starts_that_many_workers(tmp_path, monkeypatch):
    # Two "GPUs" (the cells still train on the CPU): the study starts 2 x 2 workers and each GPU
    # id is given to two of them.
    started = []

    class FakePool(InProcessExecutor):
        def __init__(self, jobs, gpus, out):
            super().__init__(None)
            started.append((jobs, list(gpus), [worker_env(s, gpus, 1)["CUDA_VISIBLE_DEVICES"] for s in range(jobs)]))

        def next_finished(self):
            job = self._todo.pop(0)
            spec = json.loads((job.cell_dir / "cell.json").read_text())
            assert spec["train"]["device"] == "cuda"
            spec["train"]["device"] = "cpu"  # the fake GPUs' cells train on the CPU
            (job.cell_dir / "cell.json").write_text(json.dumps(spec))
            return job, run_cell(job.cell_dir)

    monkeypatch.setattr(executors, "visible_gpus", lambda device: ["0", "1"])
    monkeypatch.setattr(executors, "resolve_device", lambda device: "cpu")
    monkeypatch.setattr(executors, "WorkerPoolExecutor", FakePool)
    res = ramp_study(tmp_path / "g", cells_per_gpu=2, jobs=0, batch_sizes=[32, 64], device="auto")
    assert started == [(4, ["0", "1"], ["0", "1", "0", "1"])]
    assert res["timing"]["workers"] == 4 and res["timing"]["cells_per_gpu"] == 2 and res["timing"]["cells"] == 2


def test_bytelm_preset_resolves_to_three_targets_and_dense_cells(tmp_path):
    from types import SimpleNamespace

    from bigbatch.study.cells import Cell
    from bigbatch.study.runner import _train_config, resolve_study
    from bigbatch.workloads.base import WorkloadDefaults

    wl = SimpleNamespace(name="bytelm", metric_name="val_bpb", higher_is_better=False,
                         defaults=WorkloadDefaults(batch_size=64, lr=2e-3, budget_samples=64 * 300))
    cfg = StudyConfig(workload="bytelm").resolve()
    r = resolve_study(cfg, wl)
    bs = r["batch_sizes"]
    assert len(bs) >= 5 and bs[-1] / bs[0] >= 32
    assert r["targets"] == sorted(r["targets"], reverse=True) and len(r["targets"]) == 3  # easiest (highest bpb) first
    assert r["target"] == r["targets"][-1] and r["warmup_samples"] == runner.PRESETS["bytelm"]["warmup_samples"]
    tc = _train_config(cfg, r, Cell(16, 1.0, 0), tmp_path, "cpu")
    assert tc["record_targets"] == r["targets"] and tc["target_resolution"] == 0.02 and tc["warmup_samples"] == 1280
    # A target given on the command line replaces the preset's list.
    one = resolve_study(StudyConfig(workload="bytelm", target=2.8).resolve(), wl)
    assert one["targets"] is None and one["target"] == 2.8
    assert _train_config(StudyConfig(workload="bytelm", target_resolution=0).resolve(), r, Cell(16, 1.0, 0), tmp_path,
                         "cpu")["target_resolution"] is None

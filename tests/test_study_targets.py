"""Several targets in one sweep: crossings from metrics.jsonl, per-target analysis, runner, resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from bigbatch.study import StudyConfig, run_study, steps_model
from bigbatch.study import cells as cells_mod
from bigbatch.study.analysis import analyze
from bigbatch.study.cells import target_crossings
from bigbatch.study.report import write_outputs

RESOLVED = {
    "lr": 0.1, "base_batch_size": 16, "rule": "linear", "batch_sizes": [], "target": 0.9, "targets": [0.5, 0.9],
    "budget": 10**6, "budget_steps": 5000, "eval_every_samples": 100, "eval_every_steps": 1, "metric_name": "accuracy",
    "higher_is_better": True, "workload_name": "synthetic",
}


def test_crossings_from_metrics_records():
    m = [{"kind": "train", "step": 1, "samples": 8, "b_simple": 10.0},
         {"kind": "eval", "step": 2, "samples": 16, "acc": 0.3},
         {"kind": "train", "step": 3, "samples": 24, "b_simple": float("nan")},
         {"kind": "train", "step": 4, "samples": 32, "b_simple": 20.0, "b_simple_samples": 25.0},
         {"kind": "eval", "step": 4, "samples": 32, "acc": 0.6},
         {"kind": "train", "step": 6, "samples": 48, "b_simple": 40.0},
         {"kind": "eval", "step": 6, "samples": 48, "acc": 0.55},
         {"kind": "eval", "step": 8, "samples": 64, "acc": 0.91}]
    got = target_crossings(m, [0.5, 0.6, 0.9, 0.95], "acc", True)
    assert [(e["target"], e["reached_target"], e["steps_to_target"], e["samples_to_target"], e["b_simple_at_target"]) for e in got] == [
        (0.5, True, 4, 32, 25.0), (0.6, True, 4, 32, 25.0), (0.9, True, 8, 64, 40.0), (0.95, False, None, None, None)]
    loss = [{"kind": "eval", "step": 5, "samples": 50, "loss": 2.5}, {"kind": "eval", "step": 9, "samples": 90, "loss": 1.9}]
    got = target_crossings(loss, [2.6, 2.0, 1.0], "loss", False)
    assert [e["steps_to_target"] for e in got] == [5, 9, None]
    assert got[0]["b_simple_at_target"] is None  # no reading logged before the crossing


def synthetic(rng=None):
    """Cells at x0.5 and x1; the easy target (0.5) follows B_noise 40 and is reached fastest at x0.5,
    the hard one (0.9) follows B_noise 300 and is reached fastest at x1."""
    rng = rng or np.random.default_rng(0)
    out = []
    for b in (8, 16, 32, 64, 128, 256, 512, 1024):
        for mult in (0.5, 1.0):
            for seed in (0, 1):
                noise = lambda: np.exp(rng.normal(0, 0.03))  # noqa: E731
                easy = int(round(steps_model(b, 20.0, 40.0) * (1.0 if mult == 0.5 else 1.3) * noise()))
                hard = int(round(steps_model(b, 150.0, 300.0) * (1.4 if mult == 0.5 else 1.0) * noise()))
                by_target = [
                    {"target": 0.5, "reached_target": True, "steps_to_target": easy, "samples_to_target": easy * b,
                     "b_simple_at_target": 30.0 + b % 3},
                    {"target": 0.9, "reached_target": True, "steps_to_target": hard, "samples_to_target": hard * b,
                     "b_simple_at_target": 250.0},
                ]
                out.append({"name": f"B{b}_lr{mult:g}_s{seed}", "batch_size": b, "lr_multiplier": mult, "seed": seed,
                            "lr": 0.1 * mult, "reached_target": True, "steps_to_target": hard, "samples_to_target": hard * b,
                            "final_metric": 0.91, "stopped": "target", "diverged": False, "wall_seconds": 1.0,
                            "b_simple_median": 100.0, "b_simple_at_target": 250.0, "by_target": by_target,
                            "train": {"eval_every_samples": 1}})
    return out


def test_per_target_fit_and_best_lr(tmp_path):
    res = analyze(synthetic(), StudyConfig(bootstrap=200), RESOLVED, total_cells=32)
    easy, hard = res["by_target"]
    assert (easy["target"], hard["target"]) == (0.5, 0.9) and res["targets"] == [0.5, 0.9]
    assert easy["b_crit"] == pytest.approx(40.0, rel=0.2) and hard["b_crit"] == pytest.approx(300.0, rel=0.2)
    assert easy["b_crit_interval"][0] < easy["b_crit"] < easy["b_crit_interval"][1]
    assert {row["best_lr_multiplier"] for row in easy["batch_sizes"]} == {0.5}
    assert {row["best_lr_multiplier"] for row in hard["batch_sizes"]} == {1.0}
    assert easy["b_simple"] == pytest.approx(31.0, abs=1.0) and hard["b_simple"] == 250.0
    assert easy["cells_reached"] == hard["cells_reached"] == 32
    assert easy["resolution_max"] < 0.01
    # The single-target keys describe the hardest target.
    assert res["target"] == 0.9 and res["b_crit"] == hard["b_crit"] and res["b_crit_interval"] == hard["b_crit_interval"]
    res["complete"] = True
    write_outputs(res, tmp_path)
    for name in ("b_crit_by_target.png", "steps_by_target.png"):
        assert (tmp_path / name).stat().st_size > 0
    html = (tmp_path / "report.html").read_text()
    assert "By target" in html and "accuracy ≥ 0.5" in html
    assert json.loads((tmp_path / "results.json").read_text())["by_target"][1]["b_crit"] == hard["b_crit"]


def test_an_undetermined_target_is_said_per_target(tmp_path):
    recs = [r for r in synthetic() if r["seed"] == 0]
    for r in recs:  # the easy target reached only at three batch sizes, one seed each
        e = r["by_target"][0]
        if r["batch_size"] not in (8, 16, 32):
            e.update(reached_target=False, steps_to_target=None, samples_to_target=None)
    res = analyze(recs, StudyConfig(bootstrap=100), RESOLVED, total_cells=16)
    easy, hard = res["by_target"]
    assert easy["b_crit"] is None and "too few distinct points" in easy["b_crit_undetermined"]
    assert hard["b_crit"] is not None
    res["complete"] = True
    write_outputs(res, tmp_path)
    assert "undetermined: too few distinct points" in (tmp_path / "report.html").read_text()


def test_coarse_resolution_is_a_note():
    recs = synthetic()
    for r in recs:
        r["train"] = {"eval_every_samples": 5000}
    res = analyze(recs, StudyConfig(bootstrap=50), RESOLVED, total_cells=32)
    assert any("known only to within one evaluation interval" in n for n in res["notes"])
    assert all(c["resolution"] == pytest.approx(5000 / c["samples_to_target"]) for c in res["cells"])


def tiny(out, **kw):
    base = dict(workload="linreg", workload_args={"dim": 4, "noise_std": 0.5}, batch_sizes=[1, 2, 4, 8], lr=0.1,
                base_batch_size=8, rule="none", lr_grid=[1.0], targets=[0.2, 0.05, 0.1], budget=600, budget_steps=300,
                eval_every_samples=1, eval_every_steps=1, jobs=1, bootstrap=50, progress="none", out=str(out), lr_extend=0)
    base.update(kw)
    return StudyConfig(**base)


def test_study_with_targets_then_resumed_after_a_kill(tmp_path):
    ref = run_study(tiny(tmp_path / "ref"))
    assert ref["targets"] == [0.2, 0.1, 0.05] and ref["target"] == 0.05  # lower is better: 0.05 is hardest
    assert [e["target"] for e in ref["by_target"]] == [0.2, 0.1, 0.05]
    for c in ref["cells"]:
        steps = [e["steps_to_target"] for e in c["by_target"]]
        assert all(e["reached_target"] for e in c["by_target"]) and steps == sorted(steps)
        assert steps[-1] == c["steps_to_target"]  # the hardest crossing is the trainer's own
    hardest = ref["by_target"][-1]
    assert [row["steps"] for row in hardest["batch_sizes"]] == [row["steps"] for row in ref["batch_sizes"]]

    calls = []

    def dying(cell_dir, workload=None):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(cell_dir)
        return cells_mod.run_cell(cell_dir, workload)

    with pytest.raises(KeyboardInterrupt):
        run_study(tiny(tmp_path / "k"), run_cell_fn=dying)
    resumed = run_study(tiny(tmp_path / "k"))
    assert resumed["complete"] and resumed["by_target"] == ref["by_target"]


def test_single_target_keeps_todays_keys(tmp_path):
    res = run_study(tiny(tmp_path, targets=None, target=0.05, batch_sizes=[2, 4]))
    assert "by_target" not in res and "targets" not in res and res["target"] == 0.05
    assert "by_target" not in res["cells"][0]
    assert not (tmp_path / "b_crit_by_target.png").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(target=0.1), "target and targets were both given"),
    (dict(targets=[]), "targets must name at least one target"),
    (dict(targets=[0.1, float("nan")]), "targets must be finite numbers"),
])
def test_targets_validation(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_study(tiny(tmp_path, **kw))


def test_a_finished_cell_without_its_metrics_is_refused_not_counted_as_unreached(tmp_path):
    run_study(tiny(tmp_path, targets=None, target=0.05, batch_sizes=[2, 4]))
    cell = tmp_path / "cells" / "B2_lr1_s0"
    run_dir = json.loads((cell / "result.json").read_text())["train"]["out"]
    (Path(run_dir) / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match="B2_lr1_s0: .*metrics.jsonl holds no evaluations, needed for --targets"):
        run_study(tiny(tmp_path, batch_sizes=[2, 4]))
    # The same cells serve a multi-target study whose hardest target is the old single one.
    (cell / "result.json").unlink()
    res = run_study(tiny(tmp_path, batch_sizes=[2, 4]))
    assert res["complete"] and [e["cells_reached"] for e in res["by_target"]] == [2, 2, 2]

"""A fit the measurements do not determine gives no B_crit, with the reason (synthetic cells, no training)."""

import json

import numpy as np
import pytest

from bigbatch.study import StudyConfig, steps_model
from bigbatch.study.analysis import analyze
from bigbatch.study.fit import CriticalBatchFit, bootstrap_critical_batch, fit_critical_batch, undetermined_reason
from bigbatch.study.report import write_outputs

RESOLVED = {
    "lr": 0.1, "base_batch_size": 16, "rule": "linear", "batch_sizes": [], "target": 0.9, "budget": 10**6,
    "budget_steps": 5000, "eval_every_samples": 100, "eval_every_steps": 1, "metric_name": "accuracy",
    "higher_is_better": True, "workload_name": "synthetic",
}
CFG = StudyConfig(bootstrap=200, confidence=0.9)


def cells(steps_by_b: dict[int, list[int]]) -> list[dict]:
    """One reached cell per (batch size, seed) at the LR multiplier 1 with the given steps."""
    out = []
    for b, per_seed in steps_by_b.items():
        for seed, steps in enumerate(per_seed):
            out.append({"name": f"B{b}_lr1_s{seed}", "batch_size": b, "lr_multiplier": 1.0, "seed": seed, "lr": 0.1,
                        "reached_target": True, "steps_to_target": steps, "samples_to_target": steps * b,
                        "final_metric": 0.91, "stopped": "target", "diverged": False, "wall_seconds": 1.0,
                        "b_simple_median": 50.0})
    return out


def model_steps(bs, s_min, b_noise, noise=0.03, seeds=1, seed=0):
    rng = np.random.default_rng(seed)
    return {b: [int(round(steps_model(b, s_min, b_noise) * np.exp(rng.normal(0, noise)))) for _ in range(seeds)] for b in bs}


def check_undetermined(res, match, tmp_path):
    assert res["b_crit"] is None and res["b_crit_interval"] is None and res["s_min"] is None and res["b_noise"] is None
    assert match in res["b_crit_undetermined"]
    assert any(n.startswith("B_crit undetermined: ") and match in n for n in res["notes"])
    assert all(row["regime"] is None and row["steps_fit"] is None for row in res["batch_sizes"])
    res["complete"] = True
    write_outputs(res, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["b_crit"] is None and match in data["b_crit_undetermined"]
    html = (tmp_path / "report.html").read_text()
    assert "<b>undetermined</b>" in html and "B_crit = " not in html
    assert (tmp_path / "steps.png").stat().st_size > 0


def test_three_batch_sizes_one_seed_is_not_a_zero_width_certainty(tmp_path):
    # Before: B_crit 25 with a "90% interval" 25–25 — the bootstrap can only redraw the same 3 cells.
    recs = cells(model_steps((16, 32, 64), 150.0, 30.0))
    fit = fit_critical_batch([r["batch_size"] for r in recs], [r["steps_to_target"] for r in recs])
    iv = bootstrap_critical_batch([r["batch_size"] for r in recs], [r["steps_to_target"] for r in recs], resamples=200)
    assert iv[0] == iv[1] == pytest.approx(fit.b_crit)  # the degenerate interval the analysis must not report
    check_undetermined(analyze(recs, CFG, RESOLVED, total_cells=3), "too few distinct points", tmp_path)


def test_samples_quantised_by_the_eval_interval(tmp_path):
    # Every batch size reaches the target at the first or second evaluation (10,000 or 20,000 samples).
    samples = {16: 20000, 32: 20000, 64: 20000, 128: 10000, 256: 20000, 512: 10000, 1024: 20000}
    res = analyze(cells({b: [e // b] for b, e in samples.items()}), CFG, RESOLVED, total_cells=7)
    assert res["b_crit"] is None and res["b_crit_undetermined"]
    check_undetermined(res, res["b_crit_undetermined"], tmp_path)


def test_b_crit_beyond_the_measured_batch_sizes_is_an_extrapolation(tmp_path):
    recs = cells(model_steps((8, 16, 32, 64, 128), 20.0, 600.0, noise=0.01))
    raw = fit_critical_batch([r["batch_size"] for r in recs], [r["steps_to_target"] for r in recs])
    assert raw.b_crit > 128 and not raw.at_edge  # the raw fit would report a number past the data
    check_undetermined(analyze(recs, CFG, RESOLVED, total_cells=5), "outside the measured batch sizes", tmp_path)


def test_seeds_that_agree_exactly_give_a_zero_width_interval(tmp_path):
    steps = {b: [int(round(steps_model(b, 150.0, 60.0)))] * 2 for b in (16, 32, 64, 128, 256)}
    check_undetermined(analyze(cells(steps), CFG, RESOLVED, total_cells=10), "zero width", tmp_path)


def test_a_well_measured_curve_stays_determined():
    res = analyze(cells(model_steps((8, 16, 32, 64, 128, 256, 512, 1024), 150.0, 200.0, seeds=2)), CFG, RESOLVED, total_cells=16)
    assert res["b_crit_undetermined"] is None
    assert res["b_crit"] == pytest.approx(200.0, rel=0.15)
    lo, hi = res["b_crit_interval"]
    assert lo < res["b_crit"] < hi


@pytest.mark.parametrize("fit, interval, match", [
    (CriticalBatchFit(s_min=0.4, e_min=40.0, b_noise=100.0, rmse_log=0.1, at_edge=False), (80.0, 120.0), "below one optimizer step"),
    (CriticalBatchFit(s_min=10.0, e_min=1e5, b_noise=1e4, rmse_log=0.1, at_edge=True), (80.0, 120.0), "no bend"),
    (CriticalBatchFit(s_min=10.0, e_min=1000.0, b_noise=100.0, rmse_log=0.1, at_edge=False), (100.0, 100.0), "zero width"),
    (CriticalBatchFit(s_min=10.0, e_min=1000.0, b_noise=100.0, rmse_log=0.1, at_edge=False), (80.0, 120.0), None),
])
def test_undetermined_reason_rules(fit, interval, match):
    reason = undetermined_reason([16, 32, 64, 128, 256], fit, interval)
    assert reason is None if match is None else match in reason


def test_fewer_than_three_batch_sizes():
    assert "at least 3 batch sizes" in undetermined_reason([16, 16, 32], None, None)

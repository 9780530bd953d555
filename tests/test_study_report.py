"""Analysis, plots and report from synthetic cell records (no training): best LR, B_simple, edge cases."""

import json

import numpy as np
import pytest

from bigbatch.study import StudyConfig, steps_model
from bigbatch.study.analysis import analyze, best_per_batch
from bigbatch.study.report import write_outputs

RESOLVED = {
    "lr": 0.1, "base_batch_size": 16, "rule": "linear", "batch_sizes": [], "target": 0.9, "budget": 10**6,
    "budget_steps": 5000, "eval_every_samples": 100, "eval_every_steps": 1, "metric_name": "accuracy",
    "higher_is_better": True, "workload_name": "synthetic",
}


def records(b_noise=200.0, s_min=150.0, seeds=(0, 1), b_simple=None, rng=None):
    """Cells whose best multiplier (1.0) follows the model; ×0.5 is slower, ×2 never reaches."""
    rng = rng or np.random.default_rng(0)
    out = []
    for b in (8, 16, 32, 64, 128, 256, 512, 1024):
        for mult, slow in ((0.5, 1.5), (1.0, 1.0), (2.0, None)):
            for seed in seeds:
                reached = slow is not None
                steps = int(round(steps_model(b, s_min, b_noise) * slow * np.exp(rng.normal(0, 0.03)))) if reached else None
                out.append({
                    "name": f"B{b}_lr{mult:g}_s{seed}", "batch_size": b, "lr_multiplier": mult, "seed": seed,
                    "lr": 0.1 * mult * b / 16, "reached_target": reached, "steps_to_target": steps,
                    "samples_to_target": steps * b if reached else None, "final_metric": 0.91 if reached else 0.1,
                    "stopped": "target" if reached else "max_steps", "diverged": False, "wall_seconds": 1.0,
                    "b_simple_median": b_simple,
                })
    return out


def test_best_lr_is_fewest_steps_with_all_seeds_reached():
    recs = records()
    # At B=64 make ×0.5 faster for one seed only and unreached for the other: it must not win.
    for r in recs:
        if r["batch_size"] == 64 and r["lr_multiplier"] == 0.5:
            if r["seed"] == 0:
                r["steps_to_target"], r["samples_to_target"] = 10, 640
            else:
                r["reached_target"], r["steps_to_target"], r["samples_to_target"] = False, None, None
    rows = {row["batch_size"]: row for row in best_per_batch(recs)}
    assert all(row["best_lr_multiplier"] == 1.0 for row in rows.values())
    assert rows[64]["steps_per_seed"] and len(rows[64]["seeds"]) == 2


def test_analysis_recovers_b_crit_and_b_simple(tmp_path):
    cfg = StudyConfig(bootstrap=200, confidence=0.9)
    res = analyze(records(b_simple=180.0), cfg, RESOLVED, total_cells=48)
    assert res["b_crit"] == pytest.approx(200.0, rel=0.15)
    lo, hi = res["b_crit_interval"]
    assert lo < res["b_crit"] < hi
    assert res["b_simple"] == 180.0 and res["b_simple_cells"] == 48
    regimes = [row["regime"] for row in res["batch_sizes"]]
    assert regimes[0] == "perfect scaling" and regimes[-1] == "maximal data parallelism"
    assert not any("edge of --lr-grid" in n for n in res["notes"])  # ×1, the middle of the grid, is best
    res["complete"] = True
    write_outputs(res, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "B_crit / B_simple" in html and "B_simple = 180" in html
    assert json.loads((tmp_path / "results.json").read_text())["b_simple"] == 180.0


def test_too_few_batch_sizes_is_a_note_not_a_crash(tmp_path):
    recs = [r for r in records() if r["batch_size"] in (8, 16)]
    for r in recs:
        r["b_simple_median"] = None
    res = analyze(recs, StudyConfig(), RESOLVED, total_cells=12)
    assert res["b_crit"] is None and res["b_crit_interval"] is None
    assert any("at least 3 batch sizes" in n for n in res["notes"])
    res["complete"] = False
    write_outputs(res, tmp_path)
    assert "incomplete study" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "steps.png").exists()


def test_nothing_reached_still_writes_a_report(tmp_path):
    recs = records()
    for r in recs:
        r.update(reached_target=False, steps_to_target=None, samples_to_target=None, stopped="budget")
    res = analyze(recs, StudyConfig(), RESOLVED, total_cells=len(recs))
    assert res["b_crit"] is None and all(not row["reached"] for row in res["batch_sizes"])
    assert any("not reached within the budget" in n for n in res["notes"])
    res["complete"] = True
    write_outputs(res, tmp_path)
    assert "not reached" in (tmp_path / "report.html").read_text()
    assert all((tmp_path / n).stat().st_size > 0 for n in ("steps.png", "samples.png", "pareto.png", "best_lr.png"))


def test_lr_extensions_next_multiplier_per_batch_size():
    from bigbatch.study.analysis import lr_extensions

    recs = records(seeds=(0, 1))  # x1 best and x2 never reaches: interior everywhere
    assert lr_extensions(recs, [0.5, 1.0, 2.0], 2) == []

    def at(b, mult, steps):  # one more (or a changed) cell at every seed
        out = [r for r in recs if not (r["batch_size"] == b and r["lr_multiplier"] == mult)]
        for seed in (0, 1):
            out.append({"name": f"B{b}_lr{mult:g}_s{seed}", "batch_size": b, "lr_multiplier": mult, "seed": seed,
                        "reached_target": steps is not None, "steps_to_target": steps,
                        "samples_to_target": steps * b if steps else None, "lr": mult})
        return out

    recs = at(64, 0.5, 5)  # the smallest multiplier is now best at B=64: try x0.25 there
    recs = at(128, 2.0, 5)  # the largest at B=128: try x4
    assert lr_extensions(recs, [0.5, 1.0, 2.0], 2) == [(64, 0.25), (128, 4.0)]
    assert lr_extensions(recs, [0.5, 1.0, 2.0], 0) == []
    # x0.25 even faster: x0.125 next, unless the limit of 1 extension is spent.
    recs = at(64, 0.25, 3)
    assert (64, 0.125) in lr_extensions(recs, [0.5, 1.0, 2.0], 2)
    assert (64, 0.125) not in lr_extensions(recs, [0.5, 1.0, 2.0], 1)
    # x4 did not reach the target at one seed: x2 is interior, the search at B=128 stops.
    recs = at(128, 4.0, 3)
    recs = [dict(r, reached_target=False, steps_to_target=None) if r["name"] == "B128_lr4_s1" else r for r in recs]
    assert [e for e in lr_extensions(recs, [0.5, 1.0, 2.0], 2) if e[0] == 128] == []
    # A one-multiplier grid is no LR search: never extended.
    assert lr_extensions([r for r in recs if r["lr_multiplier"] == 0.25], [0.25], 2) == []

"""bigbatch.plan: the closed-form trade-off, reading results.json, throughput, budget/deadline choices."""

import json

import pytest

from bigbatch.plan import (
    PlanConfig,
    TargetFit,
    candidate_batch_sizes,
    fits_from_results,
    make_plan,
    parse_duration,
    plan_study,
    read_study,
    throughput_from_run,
)
from bigbatch.study.fit import fit_critical_batch

S_MIN, B_NOISE = 300.0, 800.0
FIT = TargetFit(target=0.5, s_min=S_MIN, e_min=S_MIN * B_NOISE, b_crit=B_NOISE)


def single(**over):
    d = {"workload": "mnist1d", "metric_name": "loss", "higher_is_better": False, "target": 0.5,
         "b_crit": B_NOISE, "b_crit_interval": [600.0, 1100.0], "s_min": S_MIN, "e_min": S_MIN * B_NOISE,
         "b_noise": B_NOISE, "b_simple": 500.0, "notes": [], "cells": []}
    d.update(over)
    return d


BY_TARGET = [
    {"target": 1.0, "b_crit": 100.0, "s_min": 100.0, "e_min": 1.0e4, "b_crit_interval": None, "b_simple": 50.0, "cells_reached": 24},
    {"target": 0.7, "b_crit": 300.0, "s_min": 200.0, "e_min": 6.0e4, "b_crit_interval": [200, 400], "b_simple": 200.0, "cells_reached": 20},
    {"target": 0.5, "b_crit": 800.0, "s_min": 300.0, "e_min": 2.4e5, "b_crit_interval": [600, 1100], "b_simple": 500.0, "cells_reached": 16},
    {"target": 0.4, "b_crit": None, "s_min": None, "e_min": None, "reason": "only 2 batch sizes reached the target"},
]


def write(tmp_path, data):
    (tmp_path / "results.json").write_text(json.dumps(data))
    return tmp_path


def test_closed_form_reproduces_s_and_e_exactly():
    plan = make_plan(FIT, [100, 400, 800, 3200])
    by_b = {c.batch_size: c for c in plan.candidates}
    # hand-computed from eq. 2.11: S = 300(1 + 800/B), E = 240000(1 + B/800)
    assert by_b[400].steps == 900.0 and by_b[400].samples == 360000.0
    assert by_b[100].steps == 2700.0 and by_b[100].samples == 270000.0
    assert by_b[3200].steps == 375.0 and by_b[3200].samples == 1200000.0
    for c in plan.candidates:
        assert c.samples == pytest.approx(c.batch_size * c.steps, rel=1e-12)  # E = B·S
        assert (c.steps / S_MIN - 1) * (c.samples / FIT.e_min - 1) == pytest.approx(1.0, rel=1e-12)
        assert c.gpus is None and c.wall_seconds is None and c.gpu_hours is None
    assert plan.knee == {"batch_size": 800.0, "steps": 2 * S_MIN, "samples": 2 * FIT.e_min}


def test_plan_from_the_study_fit_of_synthetic_cells():
    # The study's fit (an independent least-squares path) on exact model points gives back a plan
    # whose steps at the measured batch sizes are those points.
    bs = [32, 64, 128, 256, 512, 1024, 2048, 4096]
    steps = [S_MIN * (1 + B_NOISE / b) for b in bs]
    fit = fit_critical_batch(bs, steps)
    tf = TargetFit(target=0.5, s_min=fit.s_min, e_min=fit.e_min, b_crit=fit.b_crit)
    plan = make_plan(tf, bs)
    assert [c.steps for c in plan.candidates] == pytest.approx(steps, rel=1e-4)


def test_wall_time_gpu_hours_and_marks():
    plan = make_plan(FIT, [256, 1024, 4096], gpus=[1, 4, 16], micro_batch=64, throughput=1000.0, efficiency=0.5,
                     budget_gpu_hours=0.35, deadline_seconds=300.0)
    pairs = {(c.batch_size, c.gpus): c for c in plan.candidates}
    # B=256 with 16 GPUs is 16 per GPU, not a multiple of micro-batch 64: left out and said
    assert (256, 16) not in pairs and (256, 4) in pairs and any("left out" in n for n in plan.notes)
    c = pairs[(1024, 4)]
    assert c.wall_seconds == pytest.approx(c.samples / (1000.0 * 4 * 0.5))
    assert c.gpu_hours == pytest.approx(c.wall_seconds * 4 / 3600)
    within = [x for x in plan.candidates if x.gpu_hours <= 0.35]
    assert plan.fastest is min(within, key=lambda x: (x.wall_seconds, x.gpu_hours))
    quick = [x for x in plan.candidates if x.wall_seconds <= 300.0]
    assert plan.cheapest is min(quick, key=lambda x: (x.gpu_hours, x.wall_seconds))
    # a budget buys time (B=1024 on 16 GPUs: 68.4 s), a deadline buys savings (B=256 on 4: 0.176 GPU-h)
    assert (plan.fastest.batch_size, plan.fastest.gpus) == (1024, 16)
    assert (plan.cheapest.batch_size, plan.cheapest.gpus) == (256, 4)


def test_nothing_within_budget_is_said():
    plan = make_plan(FIT, [1024], gpus=[1], throughput=1.0, budget_gpu_hours=1e-6, deadline_seconds=1e-3)
    assert plan.fastest is None and plan.cheapest is None
    assert any("no candidate fits --budget-gpu-hours" in n for n in plan.notes)
    assert any("no candidate meets --deadline" in n for n in plan.notes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gpus=[2]), "--gpus needs a per-GPU throughput"),
        (dict(throughput=10.0, efficiency=1.5), "--efficiency must be in (0.0, 1.0]"),
        (dict(throughput=-1.0), "--throughput must be > 0"),
        (dict(throughput=10.0, gpus=[8], micro_batch=64, required=[256]), "--batch-sizes 256: the per-GPU batch"),
        (dict(throughput=10.0, gpus=[0]), "--gpus must be a positive integer"),
    ],
)
def test_bad_plan_inputs(kwargs, message):
    with pytest.raises(ValueError) as e:
        make_plan(FIT, [256], **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_undetermined_fit_is_refused():
    with pytest.raises(ValueError, match="undetermined"):
        make_plan(TargetFit(target=0.4, s_min=None, e_min=None, b_crit=None, reason="too few"), [256])


def test_candidates_are_powers_of_two_around_b_noise():
    assert candidate_batch_sizes(800.0, span=2) == [256, 512, 1024, 2048, 4096]
    assert candidate_batch_sizes(3.0, span=3, extra=[96]) == [1, 2, 4, 8, 16, 32, 96]


def test_read_single_target(tmp_path):
    st = read_study(write(tmp_path, single()))
    (f,) = st.fits
    assert f.determined and f.b_noise == B_NOISE and f.b_crit_interval == (600.0, 1100.0) and f.b_simple == 500.0
    assert st.hardest() is f and st.metric_name == "loss"


def test_read_single_target_undetermined_keeps_the_reason(tmp_path):
    why = "B_crit needs at least 3 batch sizes that reached the target; 2 did"
    st = read_study(write(tmp_path, single(b_crit=None, s_min=None, e_min=None, b_noise=None, notes=[why])))
    assert not st.fits[0].determined and st.fits[0].reason == why
    with pytest.raises(ValueError, match="nothing to plan on"):
        st.hardest()
    with pytest.raises(ValueError, match="2 did"):
        plan_study(PlanConfig(study=tmp_path))


def test_read_by_target(tmp_path):
    st = read_study(write(tmp_path, single(by_target=BY_TARGET)))
    assert [f.target for f in st.fits] == [1.0, 0.7, 0.5, 0.4]
    assert st.hardest().target == 0.5  # lower is better; 0.4 is undetermined
    assert [f.target for f in st.ordered()] == [1.0, 0.7, 0.5]
    assert st.fits[3].reason == "only 2 batch sizes reached the target" and st.fits[0].cells_reached == 24
    acc = fits_from_results({"higher_is_better": True, "by_target": [dict(BY_TARGET[0], target=0.8), dict(BY_TARGET[1], target=0.9)]})
    assert acc.hardest().target == 0.9 and [f.target for f in acc.ordered()] == [0.8, 0.9]


def test_plan_study_targets_and_json_shape(tmp_path):
    res = plan_study(PlanConfig(study=write(tmp_path, single(by_target=BY_TARGET)), throughput=100.0, gpus=[1, 2]))
    d = res.to_dict()
    assert d["target"] == 0.5 and len(d["targets"]) == 4 and d["targets"][-1]["reason"]
    assert set(d["candidates"][0]) == {"batch_size", "gpus", "steps", "samples", "wall_seconds", "gpu_hours"}
    res = plan_study(PlanConfig(study=tmp_path, target=0.7))
    assert res.selected.fit.b_noise == 300.0
    with pytest.raises(ValueError, match="--target 0.3 is not a target"):
        plan_study(PlanConfig(study=tmp_path, target=0.3))
    with pytest.raises(ValueError, match="--target 0.4: B_crit is undetermined"):
        plan_study(PlanConfig(study=tmp_path, target=0.4))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"workload": "x"}', "neither b_crit nor by_target"),
        (json.dumps(single(s_min=-3.0)), "s_min must be a finite number > 0"),
        (json.dumps(single(by_target=[])), "by_target must be a non-empty list"),
        (json.dumps(single(by_target=[{"b_crit": 8.0, "s_min": 1.0, "e_min": 8.0}])), "by_target[0].target must be a number"),
    ],
)
def test_corrupt_results(tmp_path, content, message):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ValueError) as e:
        read_study(tmp_path)
    assert message in str(e.value)


def test_missing_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        read_study(tmp_path)


def test_inconsistent_b_crit_is_said(tmp_path):
    st = read_study(write(tmp_path, single(b_crit=700.0)))
    assert any("differs from e_min/s_min" in n for n in st.notes) and st.fits[0].b_noise == B_NOISE


def _run_dir(tmp_path, records, world=2, micro=16):
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"world_size": world, "micro_batch_size": micro}))
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return d


def test_throughput_from_run_median_of_steady_records(tmp_path):
    recs = [{"kind": "train", "batch_size": 64, "samples_per_s": 10.0},  # first: warm-up, dropped
            {"kind": "eval", "loss": 1.0},
            {"kind": "train", "batch_size": 64, "samples_per_s": 400.0},
            {"kind": "train", "batch_size": 64, "samples_per_s": 420.0},
            {"kind": "train", "batch_size": 128, "samples_per_s": 50.0},  # first after a change, dropped
            {"kind": "train", "batch_size": 128, "samples_per_s": 440.0}]
    per_gpu, info = throughput_from_run(_run_dir(tmp_path, recs))
    assert per_gpu == 420.0 / 2 and info["records"] == 3 and info["world_size"] == 2 and info["micro_batch_size"] == 16


def test_throughput_from_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        throughput_from_run(tmp_path)
    d = _run_dir(tmp_path, [{"kind": "eval", "loss": 1.0}])
    with pytest.raises(ValueError, match="no 'train' records"):
        throughput_from_run(d)


@pytest.mark.parametrize("text, seconds", [("90m", 5400.0), ("2h", 7200.0), ("3600s", 3600.0), ("1.5d", 129600.0), ("45", 45.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2 hours", "-3h", "0m", "h", "nan"])
def test_parse_duration_bad(text):
    with pytest.raises(ValueError, match="--deadline must be"):
        parse_duration(text)

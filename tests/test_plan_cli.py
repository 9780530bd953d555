"""``bigbatch plan``: the table, --json, --plot, --write-schedule, --throughput-from, one-line errors."""

import json

import pytest

import bigbatch.cli as cli
from bigbatch.adaptive.schedule import load_batch_schedule
from bigbatch.cli import plan as plan_cli

# Until `plan` is listed in bigbatch.cli's subcommands, register it here (idempotent).
if not any(c.name == "plan" for c in cli.app.registered_commands):
    plan_cli.register(cli.app)

BY_TARGET = [
    {"target": 1.0, "b_crit": 100.0, "s_min": 100.0, "e_min": 1.0e4, "b_crit_interval": None, "cells_reached": 24},
    {"target": 0.7, "b_crit": 300.0, "s_min": 200.0, "e_min": 6.0e4, "b_crit_interval": [200, 400], "cells_reached": 20},
    {"target": 0.5, "b_crit": 800.0, "s_min": 300.0, "e_min": 2.4e5, "b_crit_interval": [600, 1100], "cells_reached": 16},
    {"target": 0.4, "b_crit": None, "s_min": None, "e_min": None, "reason": "only 2 batch sizes reached the target"},
]


def results(**over):
    d = {"workload": "mnist1d", "metric_name": "loss", "higher_is_better": False, "target": 0.5, "b_crit": 800.0,
         "b_crit_interval": [600.0, 1100.0], "s_min": 300.0, "e_min": 2.4e5, "b_noise": 800.0, "notes": []}
    d.update(over)
    return d


@pytest.fixture
def study(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(results(by_target=BY_TARGET)))
    return d


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_table_marks_and_undetermined(capsys, study):
    code, out, err = run(capsys, "--study", study, "--throughput", 5000, "--gpus", "1,8", "--micro-batch", 32,
                         "--budget-gpu-hours", 0.05, "--deadline", "90s")
    assert code == 0, err
    assert "B_noise = B_crit = 800" in out and "S = 2·S_min = 600 steps" in out and "E = 2·E_min = 4.8e+05" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["1024", "8"])
    assert row[2:4] == ["534.4", "5.472e+05"]
    assert "fastest within 0.05 GPU-h" in out and "cheapest within 90s" in out
    assert "target 0.4: B_crit undetermined (only 2 batch sizes reached the target); no plan" in out
    assert not any(line.split()[:2] == ["64", "8"] for line in out.splitlines())  # 8 per GPU < micro-batch 32


def test_json_plot_and_schedule(capsys, study, tmp_path):
    png, sched = tmp_path / "f.png", tmp_path / "s.txt"
    code, out, err = run(capsys, "--study", study, "--throughput", 100, "--gpus", "1,2", "--json", "--plot", png,
                         "--write-schedule", sched, "--granularity", 8)
    assert code == 0, err
    d = json.loads(out)
    assert d["target"] == 0.5 and d["b_noise"] == 800.0
    c = next(c for c in d["candidates"] if c["batch_size"] == 512 and c["gpus"] == 2)
    assert c == {"batch_size": 512, "gpus": 2, "steps": 300 * (1 + 800 / 512), "samples": 2.4e5 * (1 + 512 / 800),
                 "wall_seconds": pytest.approx(2.4e5 * (1 + 512 / 800) / 200), "gpu_hours": pytest.approx(2.4e5 * (1 + 512 / 800) / 200 * 2 / 3600)}
    assert [t["target"] for t in d["targets"]] == [1.0, 0.7, 0.5, 0.4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_batch_schedule(sched) == [(0, 96), (19600, 304), (120800, 800)]
    assert d["schedule"]["schedule"] == "0:96,19600:304,120800:800"


def test_without_throughput_steps_and_samples_only(capsys, study):
    code, out, _ = run(capsys, "--study", study, "--target", 0.7, "--batch-sizes", "200")
    assert code == 0
    head = next(line for line in out.splitlines() if line.startswith("batch"))
    assert head.split() == ["batch", "steps", "samples", "mark"]
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["200"])
    assert row[1:3] == ["500", "1e+05"]  # S = 200(1 + 300/200), E = 6e4(1 + 200/300) = B·S


def test_single_target_without_a_recorded_target(capsys, tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    data = results()
    del data["target"]
    (d / "results.json").write_text(json.dumps(data))
    code, out, err = run(capsys, "--study", d, "--write-schedule", tmp_path / "s.txt")
    assert code == 0, err
    assert "target loss ?: B_noise = B_crit = 800" in out and "schedule: 0:800" in out


def test_throughput_from_run(capsys, study, tmp_path):
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "summary.json").write_text(json.dumps({"world_size": 4, "micro_batch_size": 64}))
    recs = [{"kind": "train", "batch_size": 1024, "samples_per_s": s} for s in (100.0, 4000.0, 4400.0, 4200.0)]
    (runs / "metrics.jsonl").write_text("\n".join(map(json.dumps, recs)))
    code, out, err = run(capsys, "--study", study, "--throughput-from", runs, "--gpus", "4", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["throughput_per_gpu"] == 4200.0 / 4 and d["micro_batch"] == 64
    assert min(c["batch_size"] for c in d["candidates"]) == 256  # 4 GPUs x micro-batch 64


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--study DIR is required"),
        (["--study", "{missing}"], "no results.json"),
        (["--study", "{corrupt}"], "is not valid JSON"),
        (["--study", "{undetermined}"], "2 did"),
        (["--study", "{study}", "--gpus", "2"], "--gpus needs a per-GPU throughput"),
        (["--study", "{study}", "--throughput", "10", "--gpus", "1,x"], "--gpus must be a comma-separated list"),
        (["--study", "{study}", "--throughput", "10", "--deadline", "soon"], "--deadline must be a duration"),
        (["--study", "{study}", "--throughput", "10", "--gpus", "8", "--micro-batch", "64", "--batch-sizes", "256"],
         "--batch-sizes 256: the per-GPU batch"),
        (["--study", "{study}", "--factor", "2"], "give --write-schedule FILE too"),
        (["--study", "{study}", "--target", "0.4"], "B_crit is undetermined"),
        (["--study", "{study}", "--throughput", "10", "--throughput-from", "{study}"], "not both"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, study, args, message):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "results.json").write_text('{"b_crit": 8')
    (tmp_path / "undetermined").mkdir()
    (tmp_path / "undetermined" / "results.json").write_text(json.dumps(results(
        b_crit=None, s_min=None, e_min=None, notes=["B_crit needs at least 3 batch sizes that reached the target; 2 did"])))
    paths = {"missing": tmp_path / "nope", "corrupt": tmp_path / "corrupt", "undetermined": tmp_path / "undetermined", "study": study}
    code, out, err = run(capsys, *[a.format(**paths) for a in args])
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1

"""``bigbatch noise RUN_DIR``: table, summary and PNG from a run's metrics.jsonl."""

import json
from types import SimpleNamespace

import pytest
import torch

from bigbatch.cli import main
from bigbatch.cli.noise import load_noise_records, summarize
from bigbatch.noise import NoiseMonitor, split_batch
from bigbatch.train.metrics import MetricsWriter
from bigbatch.workloads.linreg import LinReg


@pytest.fixture
def run_cli(capsys):
    """The console entry point in-process (a subprocess per call costs seconds of imports)."""

    def run(*args):
        try:
            main(["noise", *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def linreg_run(tmp_path):
    """A short SGD run on linreg that logs the monitor's reading like the trainer does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wl = LinReg(dim=8, noise_std=0.5, init_distance=2.0)
    model = wl.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = NoiseMonitor(model, beta=0.9)
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    sampler = wl.sampler(0)
    samples, B = 0, 32
    truth = []
    for step in range(1, 61):
        if step == 31:
            B = 64  # the batch size changes mid-run, as an adaptive controller would
        batch = wl.fetch(sampler.next(B))
        mon.begin_step()
        total = 0.0
        for mb in split_batch(batch, 4):
            with mon.micro_batch(wl.count(mb)):
                loss, _ = wl.loss(model, mb)
                (loss / B).backward()
            total += float(loss.detach())
        reading = mon.end_step()
        truth.append(wl.true_b_simple(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += B
        if step % 5 == 0:
            writer.write({"kind": "train", "step": step, "samples": samples, "loss": total / B, "batch_size": B, **reading.as_dict()})
            writer.write({"kind": "eval", "step": step, "samples": samples, "excess_loss": wl.evaluate(model, torch.device("cpu"))})
    writer.close()
    torch.set_num_threads(threads)
    return tmp_path, truth


def test_cli_table_summary_and_png(linreg_run, run_cli):
    run_dir, truth = linreg_run
    r = run_cli(run_dir, "--rows", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["samples", "batch", "B_simple", "|G|^2", "tr", "Sigma", "loss"]
    assert len([ln for ln in lines[1:] if ln.strip()[0].isdigit()]) == 4
    assert "B_simple (loss units): final" in r.stdout
    png = run_dir / "noise.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # B_simple grows as linreg approaches the optimum (1 + d(1 + σ²/|δ|²)); the log shows it.
    recs = load_noise_records(run_dir)
    b = [rec["b_simple"] for rec in recs if rec["b_simple"] is not None]
    assert b[-1] > b[0] and truth[-1] > truth[0]
    summ = summarize(recs)
    assert summ["batch_size"] == 64 and summ["b_simple"] == pytest.approx(b[-1])


def test_cli_out_option_and_no_plot(linreg_run, run_cli, tmp_path):
    run_dir, _ = linreg_run
    out = tmp_path / "sub" / "b.png"
    assert run_cli(run_dir, "--out", out).returncode == 0 and out.exists()
    r = run_cli(run_dir, "--no-plot")
    assert r.returncode == 0 and "plot:" not in r.stdout


def test_summary_in_examples_when_tokens(tmp_path, run_cli):
    recs = [{"kind": "train", "samples": 100 * i, "batch_size": 16, "b_simple": 800.0 * i, "b_simple_samples": 100.0 * i,
             "grad_sqnorm": 1.0, "trace_sigma": 800.0 * i} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = summarize(load_noise_records(tmp_path))
    assert s["unit"] == "examples" and s["b_simple"] == 500.0 and s["batch_over_b_simple"] == pytest.approx(16 / 500)
    r = run_cli(tmp_path, "--no-plot")
    assert "B_simple (examples): final 500" in r.stdout and "below the critical batch size" in r.stdout


def test_cli_errors(tmp_path, run_cli):
    r = run_cli(tmp_path / "missing")
    assert r.returncode == 2 and "error: run directory does not exist" in r.stderr
    r = run_cli(tmp_path)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "samples": 1, "loss": 1.0}) + "\n")
    r = run_cli(tmp_path)
    assert r.returncode == 2 and "--noise-scale" in r.stderr
    r = run_cli(tmp_path, "--rows", "0")
    assert r.returncode == 2 and "--rows must be >= 1" in r.stderr

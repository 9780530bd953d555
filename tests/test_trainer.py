"""The reference trainer: exact accumulation, exact resume, clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from bigbatch.train import TrainConfig, plan_batch, train
from bigbatch.train.metrics import read_metrics

MNIST_SMALL = {"num_samples": 2000}


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "workload,wargs,opt",
    [("linreg", {"dim": 16}, "sgd"), ("mnist1d", MNIST_SMALL, "sgd"), ("mnist1d", {**MNIST_SMALL, "model": "mlp"}, "sgd")],
)
def test_accumulation_equals_big_batch(tmp_path, workload, wargs, opt):
    common = dict(workload=workload, workload_args=wargs, batch_size=64, lr=0.05, optimizer=opt,
                  budget_samples=64 * 6, checkpoint_every_samples=0, progress="none")
    big = train(TrainConfig(**common, out=str(tmp_path / "big")))
    acc = train(TrainConfig(**common, micro_batch_size=16, out=str(tmp_path / "acc")))
    assert acc.summary["accum_steps"] == 4
    a, b = _params(big.model), _params(acc.model)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_token_normalised_accumulation_bytelm(tmp_path, bytelm_corpus):
    common = dict(workload="bytelm", workload_args={"corpus": [str(bytelm_corpus)], "context": 32, "d_model": 32,
                  "n_head": 2, "n_layer": 1, "max_bytes": None, "val_windows": 8},
                  batch_size=16, lr=1e-3, optimizer="adamw", budget_samples=16 * 3,
                  checkpoint_every_samples=0, progress="none")
    big = train(TrainConfig(**common, out=str(tmp_path / "big")))
    acc = train(TrainConfig(**common, micro_batch_size=4, out=str(tmp_path / "acc")))
    torch.testing.assert_close(_params(big.model), _params(acc.model), rtol=1e-5, atol=1e-6)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_s", "tokens_per_s")} for r in records]


def test_resume_is_bit_for_bit(tmp_path):
    common = dict(workload="mnist1d", workload_args=MNIST_SMALL, batch_size=32, lr=0.05, budget_samples=32 * 30,
                  eval_every_samples=32 * 5, checkpoint_every_samples=32 * 5, log_every_steps=2, progress="none")
    full = train(TrainConfig(**common, out=str(tmp_path / "full")))
    part = train(TrainConfig(**common, out=str(tmp_path / "part"), max_steps=13))
    assert part.summary["stopped"] == "max_steps" and part.summary["steps"] == 13
    # a crash after the step-10 checkpoint: the newest checkpoint is at step 13 (max_steps), drop it
    ckpts = sorted((tmp_path / "part" / "checkpoints").glob("ckpt_*.pt"))
    ckpts[-1].unlink()
    resumed = train(TrainConfig(**common, out=str(tmp_path / "part"), resume=True))
    assert resumed.summary["resumed_from"].endswith("ckpt_00000010.pt")
    assert torch.equal(_params(full.model), _params(resumed.model))
    assert _strip(read_metrics(tmp_path / "full" / "metrics.jsonl")) == _strip(read_metrics(tmp_path / "part" / "metrics.jsonl"))


def test_target_stops_and_records(tmp_path):
    res = train(TrainConfig(workload="linreg", workload_args={"dim": 8}, batch_size=32, lr=0.1, budget_samples=32 * 400,
                            eval_every_samples=32, target=0.05, out=str(tmp_path), progress="none"))
    s = res.summary
    assert s["reached_target"] and s["stopped"] == "target"
    assert s["steps_to_target"] == s["steps"] and s["samples_to_target"] == 32 * s["steps"]
    assert s["final_metric"] <= 0.05
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_metric", "metric_name", "steps", "samples", "reached_target", "wall_seconds"):
        assert key in saved


def test_divergence_stops_with_message(tmp_path, capsys):
    res = train(TrainConfig(workload="linreg", workload_args={"dim": 8}, batch_size=32, lr=50.0, budget_samples=32 * 400,
                            log_every_steps=1, checkpoint_every_samples=32 * 2, out=str(tmp_path), progress="none"))
    assert res.summary["diverged"]
    assert "diverged" in capsys.readouterr().out
    blob = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert all(torch.isfinite(t).all() for t in blob["model"].values())


def test_plan_batch_errors():
    assert plan_batch(256, 2, 32).accum_steps == 4
    with pytest.raises(ValueError, match="world size"):
        plan_batch(255, 2, None)
    with pytest.raises(ValueError, match="micro-batch-size"):
        plan_batch(96, 1, 64)
    with pytest.raises(ValueError, match="batch_size"):
        plan_batch(0, 1, None)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bigbatch", "train", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lr", "-0.1"], "--lr must be > 0"),
        (["--lr", "nan"], "--lr must be > 0"),
        (["--workload", "mnist2d"], "did you mean mnist1d"),
        (["--optimizer", "lamm"], "adamw"),
        (["--batch-size", "100", "--micro-batch-size", "30"], "--micro-batch-size 30"),
        (["--workload", "bytelm", "--corpus", "/no/such/dir"], "--corpus path does not exist"),
        (["--out", "/proc/forbidden/x"], "--out"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle):
    r = _cli("--workload-arg", "num_samples=2000", "--out", str(tmp_path / "o"), *args) if "--workload" not in args else _cli("--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_train_runs_and_reports(tmp_path):
    r = _cli("--workload", "linreg", "--workload-arg", "dim=4", "--budget-samples", "640", "--out", str(tmp_path), "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "summary.json" in r.stdout
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "summary.json").exists()


def _poisoned_linreg(bad_calls):
    """linreg whose loss is NaN on the given (1-based) calls of ``loss``."""
    from bigbatch.workloads import load_workload

    wl = load_workload("linreg", dim=8)
    calls = {"n": 0}
    plain_loss = wl.loss

    def poisoned(model, batch):
        calls["n"] += 1
        loss, count = plain_loss(model, batch)
        return (loss * float("nan") if bad_calls(calls["n"]) else loss), count

    wl.loss = poisoned
    return wl


def test_nonfinite_gradient_refused_by_optimizer_stops_as_diverged(tmp_path, capsys):
    """LAMB refuses a NaN gradient (state untouched); the trainer stops with a message, not a traceback."""
    wl = _poisoned_linreg(lambda n: n > 12)
    res = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, optimizer="lamb", budget_samples=32 * 40,
                            log_every_steps=100, checkpoint_every_samples=32 * 4, out=str(tmp_path), progress="none"),
                workload=wl)
    assert res.summary["diverged"] and res.summary["steps"] == 12
    assert "non-finite" in capsys.readouterr().out
    blob = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert blob["step"] == 12 and all(torch.isfinite(t).all() for t in blob["model"].values())


def test_bytelm_gpt2_small_preset_is_context_1024(bytelm_corpus):
    # The preset is GPT-2 small's whole shape, context included (it once silently kept context 128,
    # and every "GPT-2-small" benchmark ran 8x shorter sequences than it said).
    from bigbatch.workloads.bytelm import ByteLM

    wl = ByteLM(corpus=[str(bytelm_corpus)], size="gpt2-small")
    assert (wl.cfg.n_layer, wl.cfg.n_head, wl.cfg.d_model, wl.cfg.context) == (12, 12, 768, 1024)
    assert ByteLM(corpus=[str(bytelm_corpus)], size="gpt2-small", context=256).cfg.context == 256
    assert ByteLM(corpus=[str(bytelm_corpus)]).cfg.context == 128


def test_deferred_nonfinite_check_stops_at_the_next_log_step(tmp_path, capsys, monkeypatch):
    """On a GPU, fused LAMB skips a NaN step on the device (no per-step sync) and the loop reports it
    at the next log step: the run stops as diverged there, and no NaN reached the weights."""
    import bigbatch.train.setup as setup_mod

    monkeypatch.setattr(setup_mod, "_defers_nonfinite", lambda opt: True)  # as the fused path on CUDA
    wl = _poisoned_linreg(lambda n: n in (13, 14))
    res = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, optimizer="lamb", budget_samples=32 * 40,
                            log_every_steps=5, checkpoint_every_samples=32 * 4, out=str(tmp_path), progress="none"),
                workload=wl)
    out = capsys.readouterr().out
    assert res.summary["diverged"] and res.summary["steps"] == 15
    assert "non-finite (nan/inf) gradient in 2 step(s) up to step 15" in out
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_deferred_nonfinite_check_runs_at_the_end_of_a_run(tmp_path, capsys, monkeypatch):
    """A skipped step after the last log step is still reported (the run ends as diverged)."""
    import bigbatch.train.setup as setup_mod

    monkeypatch.setattr(setup_mod, "_defers_nonfinite", lambda opt: True)
    wl = _poisoned_linreg(lambda n: n == 7)
    res = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, optimizer="lamb", max_steps=8,
                            log_every_steps=100, out=str(tmp_path), progress="none"), workload=wl)
    assert res.summary["diverged"] and "non-finite" in capsys.readouterr().out


def test_a_run_that_never_beats_its_first_evaluation_stops_as_stalled(tmp_path, capsys):
    from bigbatch.workloads import load_workload

    wl = load_workload("linreg", dim=8)
    wl.evaluate = lambda model, device: 1.0  # never better than at step 0
    res = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, budget_samples=32 * 100,
                            eval_every_samples=32 * 5, stall_fraction=0.1, out=str(tmp_path), progress="none"),
                workload=wl)
    assert res.summary["stopped"] == "stalled" and res.summary["steps"] == 10
    # A run that learned and then fell back to its start (an LR that blew up) stops at the next evaluation.
    values = iter([1.0, 0.5, 0.2, 0.1, 0.99] + [0.99] * 50)
    wl.evaluate = lambda model, device: next(values)
    res = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, budget_samples=32 * 100, target=0.0,
                            eval_every_samples=32 * 5, stall_fraction=0.1, out=str(tmp_path / "c"), progress="none"),
                workload=wl)
    assert res.summary["stopped"] == "stalled" and res.summary["steps"] == 20 and not res.summary["reached_target"]
    assert "no progress from the first evaluation's 1" in capsys.readouterr().out
    # With a target, jitter around the first value is no progress: 1% of the way to it is not 5%.
    values = iter([1.0] + [0.99, 1.01] * 50)
    wl.evaluate = lambda model, device: next(values)
    res = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, budget_samples=32 * 100, target=0.0,
                            eval_every_samples=32 * 5, stall_fraction=0.1, out=str(tmp_path / "t"), progress="none"),
                workload=wl)
    assert res.summary["stopped"] == "stalled" and res.summary["steps"] == 10
    # A run that learns is not stopped: it runs out its budget.
    ok = train(TrainConfig(workload="linreg", batch_size=32, lr=0.01, budget_samples=32 * 100, eval_every_samples=32 * 5,
                           stall_fraction=0.1, out=str(tmp_path / "ok"), progress="none"))
    assert ok.summary["stopped"] == "budget" and ok.summary["steps"] == 100


def test_stall_fraction_is_checked(tmp_path):
    with pytest.raises(ValueError, match="stall_fraction"):
        train(TrainConfig(workload="linreg", batch_size=32, stall_fraction=1.5, out=str(tmp_path), progress="none"))
    from bigbatch.study import StudyConfig

    with pytest.raises(ValueError, match="stall_fraction must be 0"):
        StudyConfig(stall_fraction=1.0).resolve()

"""The trainer with the core wired in: scaling rule per running batch, adaptive batch changes,
the noise monitor, EMA and checkpoint averaging; and resume with all of them on."""

import math

import pytest
import torch

from bigbatch.scaling import Recipe, ScalingPlan
from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics

LIN = dict(workload="linreg", workload_args={"dim": 16}, progress="none")


def _train_records(outdir):
    return [r for r in read_metrics(outdir / "metrics.jsonl") if r.get("kind") == "train"]


def test_batch_doubling_midway_keeps_rule_lr_at_same_samples(tmp_path):
    """A ramp 32 -> 64 halfway: each step's LR is the rule's LR for that step's batch at that sample count."""
    budget = 32 * 40
    cfg = TrainConfig(**LIN, batch_size=32, micro_batch_size=16, lr=0.02, optimizer="sgd", rule="sqrt", base_batch_size=32,
                      warmup_samples=32 * 10, schedule="cosine", budget_samples=budget, log_every_steps=1,
                      adaptive="ramp", adaptive_args={"start_batch": 32, "end_batch": 64, "ramp_samples": budget // 2,
                                                      "increment": 32},
                      out=str(tmp_path))
    s = train(cfg).summary
    assert s["batch_changes"] == 1 and s["batch_size"] == 64
    recs = _train_records(tmp_path)
    assert {r["batch_size"] for r in recs} == {32, 64}
    plan = ScalingPlan(Recipe.from_samples(dataset_size=10**9, batch_size=32, lr=0.02, optimizer="sgd", momentum=0.0,
                                           warmup_samples=32 * 10, budget_samples=budget, schedule="cosine"), "sqrt")
    for r in recs:  # "samples" is after the step, i.e. the sample count the step's LR is taken at
        assert r["lr"] == pytest.approx(plan.lr_at(r["samples"], r["batch_size"]), rel=1e-12)
    first64 = next(r for r in recs if r["batch_size"] == 64)
    # at the same sample count, the doubled batch has the sqrt rule's factor sqrt(2) over batch 32
    assert first64["lr"] / plan.lr_at(first64["samples"], 32) == pytest.approx(math.sqrt(2), rel=1e-12)
    changes = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("kind") == "batch_size"]
    assert len(changes) == 1 and changes[0]["old"] == 32 and changes[0]["new"] == 64 and changes[0]["accum_steps"] == 4


def test_noise_monitor_logs_and_summarises(tmp_path):
    cfg = TrainConfig(**LIN, batch_size=64, micro_batch_size=16, lr=0.05, budget_samples=64 * 60, log_every_steps=5,
                      noise_scale=True, out=str(tmp_path))
    s = train(cfg).summary
    assert s["noise_mode"] == "accumulation"
    recs = _train_records(tmp_path)
    assert all({"b_simple", "grad_sqnorm", "trace_sigma"} <= set(r) for r in recs)
    assert s["b_simple_median"] is not None and s["b_simple_median"] > 0


def test_split_mode_without_accumulation(tmp_path):
    cfg = TrainConfig(**LIN, batch_size=64, lr=0.05, budget_samples=64 * 30, log_every_steps=5, noise_scale=True,
                      out=str(tmp_path))
    s = train(cfg).summary
    assert s["noise_mode"] == "split" and s["b_simple_median"] > 0


def test_ema_and_average_last_evaluated_next_to_final(tmp_path):
    cfg = TrainConfig(workload="mnist1d", workload_args={"num_samples": 2000, "model": "mlp"}, batch_size=64, lr=0.05,
                      budget_samples=64 * 40, eval_every_samples=64 * 5, checkpoint_every_samples=64 * 5,
                      ema_horizon_samples=64 * 10, average_last=3, progress="none", out=str(tmp_path))
    s = train(cfg).summary
    assert len(s["averaged_checkpoints"]) == 3
    assert 0 < s["averaged_metric"] <= 1 and 0 < s["ema_metric"] <= 1
    avg = torch.load(tmp_path / "averaged.pt", weights_only=True)
    ck = sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))[-3:]
    for k, v in avg.items():
        mean = sum(torch.load(p, weights_only=False)["model"][k].double() for p in ck) / 3
        torch.testing.assert_close(v.double(), mean, rtol=1e-6, atol=1e-7)
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("kind") == "eval"]
    assert all("ema_accuracy" in r for r in evals)


def test_resume_with_noise_adaptive_and_ema_is_bit_for_bit(tmp_path):
    common = dict(**LIN, batch_size=16, micro_batch_size=8, lr=0.05, budget_samples=16 * 60, log_every_steps=2,
                  eval_every_samples=16 * 5, checkpoint_every_samples=16 * 5, noise_scale=True, noise_beta=0.9,
                  adaptive="noise", adaptive_args={"max_batch": 128, "min_interval": 16 * 4},
                  ema_horizon_samples=200)
    full = train(TrainConfig(**common, out=str(tmp_path / "full")))
    part = train(TrainConfig(**common, out=str(tmp_path / "part"), max_steps=17))
    assert part.summary["stopped"] == "max_steps"
    resumed = train(TrainConfig(**common, out=str(tmp_path / "part"), resume=True))
    a = torch.cat([p.reshape(-1) for p in full.model.parameters()])
    b = torch.cat([p.reshape(-1) for p in resumed.model.parameters()])
    assert torch.equal(a, b)
    for key in ("steps", "samples", "batch_size", "batch_changes", "b_simple", "ema_metric", "final_metric"):
        assert full.summary[key] == resumed.summary[key], key


def test_controller_sees_noise_in_examples_for_token_losses():
    """Token-normalised losses: B_simple and tr(Σ) reach the controller per example, |G|² unchanged."""
    from types import SimpleNamespace

    from bigbatch.train.state import RunState
    from bigbatch.train.step import controller_state as _controller_state

    est = SimpleNamespace(n_updates=3, grad_sqnorm=2.0, trace_sigma=40.0, b_simple=20.0)
    st = _controller_state(SimpleNamespace(estimator=est, units_per_sample=4.0), RunState(samples=10, step=1), 8)
    assert (st.b_simple, st.trace_sigma, st.grad_sqnorm) == (5.0, 10.0, 2.0)
    assert st.b_simple == st.trace_sigma / st.grad_sqnorm
    st = _controller_state(SimpleNamespace(estimator=est, units_per_sample=float("nan")), RunState(samples=10, step=1), 8)
    assert st.b_simple == 20.0  # examples are the loss unit: no conversion
    assert _controller_state(None, RunState(samples=10, step=1), 8).b_simple is None

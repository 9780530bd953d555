"""The schedule controller inside the trainer: batch changes at the thresholds, the LR moved by the
scaling rule, and a resume mid-schedule that continues bit for bit.
"""

import math

import pytest
import torch

from bigbatch.scaling import Recipe, ScalingPlan
from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics

LIN = dict(workload="linreg", workload_args={"dim": 16}, progress="none")


def test_trainer_follows_schedule_with_rule_lr(tmp_path):
    budget = 32 * 40
    cfg = TrainConfig(**LIN, batch_size=32, micro_batch_size=16, lr=0.02, optimizer="sgd", rule="sqrt", base_batch_size=32,
                      budget_samples=budget, log_every_steps=1, adaptive="schedule",
                      adaptive_args={"schedule": "0:32,320:64,800:128"}, out=str(tmp_path))
    s = train(cfg).summary
    assert s["batch_changes"] == 2 and s["batch_size"] == 128
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("kind") == "train"]
    for r in recs:  # each step's batch is the schedule's at the samples seen before it
        before = r["samples"] - r["batch_size"]
        assert r["batch_size"] == (32 if before < 320 else 64 if before < 800 else 128), r
    plan = ScalingPlan(Recipe.from_samples(dataset_size=10**9, batch_size=32, lr=0.02, optimizer="sgd", momentum=0.0,
                                           budget_samples=budget, schedule="constant"), "sqrt")
    first128 = next(r for r in recs if r["batch_size"] == 128)
    assert first128["lr"] == pytest.approx(plan.lr_at(first128["samples"], 128), rel=1e-12)
    assert first128["lr"] / plan.lr_at(first128["samples"], 32) == pytest.approx(math.sqrt(4), rel=1e-12)


def test_trainer_resume_mid_schedule_is_bit_for_bit(tmp_path):
    common = dict(**LIN, batch_size=16, micro_batch_size=8, lr=0.05, budget_samples=16 * 50, log_every_steps=2,
                  checkpoint_every_samples=16 * 5, eval_every_samples=16 * 5, adaptive="schedule",
                  adaptive_args={"schedule": "0:16,160:32,480:64"})
    full = train(TrainConfig(**common, out=str(tmp_path / "full")))
    part = train(TrainConfig(**common, out=str(tmp_path / "part"), max_steps=12))  # 12 steps: past 160, before 480
    assert part.summary["stopped"] == "max_steps" and part.summary["batch_size"] == 32
    resumed = train(TrainConfig(**common, out=str(tmp_path / "part"), resume=True))
    a = torch.cat([p.reshape(-1) for p in full.model.parameters()])
    b = torch.cat([p.reshape(-1) for p in resumed.model.parameters()])
    assert torch.equal(a, b)
    for key in ("steps", "samples", "batch_size", "batch_changes", "final_metric"):
        assert full.summary[key] == resumed.summary[key], key


def test_batch_schedule_field_and_flag(tmp_path, capsys):
    """``batch_schedule`` (``--batch-schedule``) is the schedule controller; combined with another
    controller it is a one-line error naming both."""
    from bigbatch.cli import main

    cfg = TrainConfig(**LIN, batch_size=16, lr=0.02, optimizer="sgd", budget_samples=16 * 20, log_every_steps=1,
                      batch_schedule="0:16,160:32", out=str(tmp_path / "a"))
    s = train(cfg).summary
    assert s["batch_size"] == 32 and s["batch_changes"] == 1
    changes = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "batch_size"]
    assert [(c["samples"], c["new"]) for c in changes] == [(160, 32)]
    with pytest.raises(ValueError, match="batch_schedule sets the batch itself.*adaptive='noise'"):
        train(TrainConfig(**LIN, batch_schedule="0:16", adaptive="noise", out=str(tmp_path / "b")))
    with pytest.raises(SystemExit) as e:
        main(["train", "--workload", "linreg", "--batch-schedule", "0:16,oops", "--progress", "none",
              "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1

"""Dense evaluation (target_resolution): crossings located by replaying an interval from a snapshot."""

import pytest
import torch
from torch import nn

from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics
from bigbatch.workloads.base import StreamSampler, WorkloadDefaults


class Ramp:
    """A metric that falls by exactly ``1/64`` per optimizer step, whatever the batch size.

    One parameter ``w`` with loss ``w`` per example: plain SGD at LR 1/64 moves it by 1/64 a step
    (exact in binary floating point), so the metric ``w`` first reaches ``100 − k/64`` at step k.
    A second parameter follows random gradients and the evaluation draws a random number too:
    a replay that did not restore the RNG states, or let evaluations shift them, would end with
    other weights than a run without dense evaluation.
    """

    name = "ramp"
    metric_name = "w"
    higher_is_better = False
    count_unit = "examples"
    dataset_size = 1 << 30

    def __init__(self):
        self.defaults = WorkloadDefaults(batch_size=8, lr=1 / 64, optimizer="sgd", momentum=0.0, budget_samples=8 * 1000)

    def build_model(self):
        m = nn.Module()
        m.w = nn.Parameter(torch.tensor(100.0))
        m.v = nn.Parameter(torch.tensor(0.0))
        return m

    def sampler(self, seed):
        return StreamSampler(seed)

    def fetch(self, indices):
        return {"x": torch.ones(len(indices))}

    def count(self, batch):
        return int(batch["x"].shape[0])

    def loss(self, model, batch):
        n = batch["x"].shape[0]
        return model.w * batch["x"].sum() + model.v * torch.randn(()) * n, torch.tensor(n)

    @torch.no_grad()
    def evaluate(self, model, device):
        torch.rand(3)  # an evaluation that draws random numbers
        return float(model.w)


def ramp_run(tmp_path, name, **kw):
    base = dict(workload="ramp", batch_size=8, lr=1 / 64, optimizer="sgd", momentum=0.0, budget_samples=8 * 1000,
                eval_every_samples=8 * 100, checkpoint_every_samples=0, progress="none", out=str(tmp_path / name))
    base.update(kw)
    return train(TrainConfig(**base), Ramp())


def test_dense_crossing_is_exact_to_the_resolution_and_changes_nothing_else(tmp_path):
    k = 537  # w reaches 100 - 537/64 at step 537; evaluations every 100 steps see it at 600
    target = 100 - k / 64
    coarse = ramp_run(tmp_path, "coarse", target=target, budget_samples=8 * 1000)
    dense = ramp_run(tmp_path, "dense", target=target, budget_samples=8 * 1000, target_resolution=0.02)
    assert coarse.summary["steps_to_target"] == 600 and coarse.summary["resolution"] == pytest.approx(100 / 600)
    s = dense.summary
    assert k <= s["steps_to_target"] <= k * 1.02 and s["steps_to_target"] < 600
    assert s["resolution"] <= 0.02 and s["samples_to_target"] == 8 * s["steps_to_target"]
    assert s["dense_replays"] == 1 and s["steps"] == coarse.summary["steps"] == 600  # stopped where it was
    for name in ("w", "v"):  # the replay left the run's trajectory as it was, random draws included
        assert torch.equal(getattr(dense.model, name), getattr(coarse.model, name))
    evals = [r for r in read_metrics(tmp_path / "dense" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == sorted(r["step"] for r in evals)  # dense records before the 600 one
    for r in evals:  # every dense evaluation saw the exact ramp: the replay retraced the steps
        assert r["w"] == pytest.approx(100 - r["step"] / 64, abs=1e-4)


def test_every_target_crossed_in_one_interval_is_located_and_the_run_goes_on(tmp_path):
    # Three targets cross between the evaluations at 200 and 300 steps; the run continues to its budget.
    targets = [100 - 210 / 64, 100 - 250 / 64, 100 - 290 / 64]
    plain = ramp_run(tmp_path, "plain", record_targets=targets, budget_samples=8 * 700)
    dense = ramp_run(tmp_path, "dense", record_targets=targets, budget_samples=8 * 700, target_resolution=0.02)
    assert [c["steps"] for c in plain.summary["crossings"]] == [300, 300, 300]
    got = sorted(dense.summary["crossings"], key=lambda c: c["steps"])
    for c, k in zip(got, (210, 250, 290)):
        assert k <= c["steps"] and c["resolution"] <= 0.02 and (c["steps"] - k) <= 0.02 * k
    assert dense.summary["dense_replays"] == 1
    assert dense.summary["steps"] == plain.summary["steps"] == 700
    for name in ("w", "v"):
        assert torch.equal(getattr(dense.model, name), getattr(plain.model, name))


def test_a_crossing_in_the_first_steps_is_located_to_one_step(tmp_path):
    # Below 1/resolution steps the dense evaluations run every step: the crossing is exact.
    dense = ramp_run(tmp_path, "d", target=100 - 7 / 64, target_resolution=0.02)
    assert dense.summary["steps_to_target"] == 7 and dense.summary["crossings"][0]["resolution_steps"] == 1


def test_no_replay_where_the_evaluations_are_already_fine_enough(tmp_path):
    dense = ramp_run(tmp_path, "d", target=100 - 537 / 64, eval_every_samples=8, target_resolution=0.02)
    assert dense.summary["steps_to_target"] == 537 and dense.summary["dense_replays"] == 0


def test_replay_retraces_a_stochastic_run_exactly(tmp_path):
    # Linear regression on fresh random data: the dense evaluations of a replay must equal those of
    # a run evaluating at every step, value for value (CPU), and the crossing cannot come earlier.
    common = dict(workload="linreg", workload_args={"dim": 8, "noise_std": 0.5}, batch_size=16, lr=0.01,
                  budget_samples=16 * 400, checkpoint_every_samples=0, progress="none", record_targets=[0.01], seed=3)
    every = train(TrainConfig(**common, eval_every_samples=16, out=str(tmp_path / "every")))
    dense = train(TrainConfig(**common, eval_every_samples=16 * 50, target_resolution=0.02, out=str(tmp_path / "dense")))
    ref = {r["step"]: r["excess_loss"] for r in read_metrics(tmp_path / "every" / "metrics.jsonl") if r["kind"] == "eval"}
    dense_evals = [r for r in read_metrics(tmp_path / "dense" / "metrics.jsonl") if r.get("dense")]
    assert len(dense_evals) > 5 and all(r["excess_loss"] == ref[r["step"]] for r in dense_evals)
    exact, c = every.summary["crossings"][0], dense.summary["crossings"][0]
    assert exact["steps"] <= c["steps"] < 50 * -(-exact["steps"] // 50)
    torch.testing.assert_close(every.model.weight, dense.model.weight, rtol=0, atol=0)
    assert c["resolution"] <= 0.02 or c["resolution_steps"] == 1


def test_target_resolution_is_checked(tmp_path):
    with pytest.raises(ValueError, match="target_resolution"):
        ramp_run(tmp_path, "x", target=99.0, target_resolution=1.5)
    with pytest.raises(ValueError, match="record_targets must be finite"):
        ramp_run(tmp_path, "y", record_targets=[float("nan")])


def test_a_resumed_run_locates_the_same_crossings(tmp_path):
    # Stopped at 200 steps, an evaluation: the resumed run takes its snapshot there again and
    # locates the crossings as the uninterrupted run does, with the same final weights.
    kw = dict(record_targets=[100 - 237 / 64, 100 - 537 / 64], budget_samples=8 * 700, target_resolution=0.02)
    whole = ramp_run(tmp_path, "whole", **kw)
    ramp_run(tmp_path, "cut", max_steps=200, **kw)
    resumed = ramp_run(tmp_path, "cut", resume=True, **kw)
    assert resumed.summary["crossings"] == whole.summary["crossings"]
    assert [c["steps"] for c in whole.summary["crossings"]][0] < 240
    for name in ("w", "v"):
        assert torch.equal(getattr(resumed.model, name), getattr(whole.model, name))
    # Stopped between evaluations (250 steps): the next crossing is placed at its evaluation,
    # and its resolution says so (the run cannot know what happened since the last one).
    ramp_run(tmp_path, "off", max_steps=250, **kw)
    off = ramp_run(tmp_path, "off", resume=True, **kw)
    first = off.summary["crossings"][0]
    assert (first["steps"], first["resolution"]) == (300, pytest.approx(100 / 300))
    assert off.summary["crossings"][1] == whole.summary["crossings"][1]

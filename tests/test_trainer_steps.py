"""The trainer's named steps called directly, the batch plan's errors, and the adaptive
controllers that turn the noise measurement on by themselves."""

import subprocess
import sys

import pytest
import torch

from bigbatch.train import TrainConfig, plan_batch, train
from bigbatch.train.metrics import read_metrics
from bigbatch.workloads import load_workload


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_train_step_is_one_sgd_step_on_the_global_batch(tmp_path):
    """Four accumulated micro-batches: exactly one SGD step on the mean gradient of the 16 examples."""
    from bigbatch.train.setup import setup
    from bigbatch.train.step import Interval, train_step

    cfg = TrainConfig(workload="linreg", workload_args={"dim": 8}, batch_size=16, micro_batch_size=4, lr=0.05,
                      budget_samples=160, progress="none", out=str(tmp_path))
    run, state, plan = setup(cfg)
    assert plan.accum_steps == 4 and state.step == 0
    interval = Interval.start(run.device)
    assert train_step(run, state, plan, interval) is None
    assert (state.step, state.samples, interval.steps, interval.count) == (1, 16, 1, 16)
    assert run.lr == 0.05
    run.metrics.close()
    run.progress.close()

    wl = load_workload("linreg", dim=8)
    model = wl.build_model()
    batch = wl.fetch(wl.sampler(0).next(16))
    loss_sum, count = wl.loss(model, batch)
    (loss_sum / count).backward()
    expected = _params(model) - 0.05 * model.weight.grad.reshape(-1)
    torch.testing.assert_close(_params(run.raw_model), expected, rtol=1e-6, atol=1e-7)
    assert float(interval.loss) == pytest.approx(float(loss_sum.detach()), rel=1e-6)
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # logging is its own step


def test_batch_size_zero_and_oversized_micro_batch_are_errors(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        train(TrainConfig(workload="linreg", batch_size=0, progress="none", out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="--micro-batch-size 128 is larger than the per-rank batch 64"):
        plan_batch(64, 1, 128)
    with pytest.raises(ValueError, match="per-rank batch 32"):
        plan_batch(64, 2, 64)
    assert plan_batch(64, 2, 32).accum_steps == 1
    # an adaptive controller never picks a batch that is not whole micro-batches
    with pytest.raises(ValueError, match="granularity must be a multiple of micro_batch_size x world size = 16"):
        train(TrainConfig(workload="linreg", batch_size=16, micro_batch_size=16, adaptive="noise",
                          adaptive_args={"granularity": 4}, progress="none", out=str(tmp_path / "b")))


@pytest.mark.parametrize("args,needle", [(["--batch-size", "0"], "batch"),
                                         (["--batch-size", "64", "--micro-batch-size", "128"], "micro")])
def test_cli_batch_errors_one_line_exit_2(tmp_path, args, needle):
    r = subprocess.run([sys.executable, "-m", "bigbatch", "train", "--workload", "linreg", "--out", str(tmp_path), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # the library names the field (batch_size, micro_batch_size); the CLI may print it as its flag
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and ("0" in r.stderr or "128" in r.stderr)


ADAPT = dict(workload="linreg", workload_args={"dim": 8}, batch_size=16, micro_batch_size=16, lr=0.05,
             adaptive="noise", adaptive_args={"max_batch": 64, "min_readings": 4, "max_rse": 1.0}, log_every_steps=2, budget_samples=16 * 60,
             eval_every_samples=16 * 10, checkpoint_every_samples=16 * 4, progress="none")


def test_adaptive_noise_turns_the_measurement_on_and_grows(tmp_path, capsys):
    """Without --noise-scale the controller still gets readings (it said so) and grows the batch; one
    micro-batch per step became two, so 'auto' moved from split to accumulation mode."""
    s = train(TrainConfig(**ADAPT, out=str(tmp_path))).summary
    out = capsys.readouterr().out
    assert out.count("--adaptive noise decides from gradient noise readings") == 1 and "mode split" in out
    assert s["batch_changes"] >= 1 and s["batch_size"] > 16
    assert s["noise_mode"] == "accumulation" and s["b_simple_median"] > 0
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert all("b_simple" in r for r in recs)


def test_mode_switch_resumes_bit_for_bit(tmp_path):
    full = train(TrainConfig(**ADAPT, out=str(tmp_path / "full")))
    first = next(r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "batch_size")
    stop = first["step"] - 1  # checkpointed in split mode, switched to accumulation after the resume
    train(TrainConfig(**ADAPT, out=str(tmp_path / "part"), max_steps=stop))
    resumed = train(TrainConfig(**ADAPT, out=str(tmp_path / "part"), resume=True))
    assert torch.equal(_params(full.model), _params(resumed.model))
    for key in ("steps", "batch_size", "batch_changes", "b_simple", "noise_mode"):
        assert full.summary[key] == resumed.summary[key], key


def test_step_time_leaves_evaluation_and_checkpoints_out(tmp_path):
    """A slow evaluation (0.3 s) at every other step must not show up in the logged step time."""
    import time

    wl = load_workload("linreg", dim=8)
    slow = wl.evaluate

    def evaluate(model, device):
        time.sleep(0.3)
        return slow(model, device)

    wl.evaluate = evaluate
    cfg = TrainConfig(workload="linreg", batch_size=16, lr=0.05, budget_samples=16 * 8, eval_every_samples=32,
                      log_every_steps=2, progress="none", out=str(tmp_path))
    train(cfg, workload=wl)
    times = [r["step_time"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(times) == 4
    assert max(times) < 0.1, times  # with the evaluations counted, each 2-step interval would be >= 0.15 s/step

"""Two CPU processes under torchrun (gloo): DDP and FSDP2 equal single-process accumulation,
and a worker killed mid-run is restarted by torchrun and finishes where an uninterrupted run does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bigbatch.train import TrainConfig, train
from bigbatch.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

COMMON = [
    "--batch-size", "32", "--lr", "0.05", "--optimizer", "sgd", "--momentum", "0.9",
    "--budget-samples", str(32 * 12), "--progress", "none", "--device", "cpu",
]


def _torchrun(tmp_path: Path, out: str, *args: str, max_restarts: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "-m", "bigbatch", "train", *COMMON, "--out", str(tmp_path / out), *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _final_params(outdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(outdir / "checkpoints"), weights_only=False)["model"]


def _single(tmp_path: Path, workload: str, wargs: dict) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(workload=workload, workload_args=wargs, batch_size=32, micro_batch_size=16, lr=0.05,
                      optimizer="sgd", momentum=0.9, budget_samples=32 * 12, progress="none", device="cpu",
                      out=str(tmp_path / "single"))
    return train(cfg).model.state_dict()


@pytest.mark.parametrize("strategy", ["--ddp", "--fsdp"])
@pytest.mark.parametrize("workload,wargs", [("linreg", {"dim": 16}), ("mnist1d", {"num_samples": 2000, "model": "mlp"})])
def test_two_processes_equal_accumulation(tmp_path, strategy, workload, wargs):
    ref = _single(tmp_path, workload, wargs)
    wflags = [x for k, v in wargs.items() for x in ("-w", f"{k}={v}")]
    _torchrun(tmp_path, "dist", "--workload", workload, *wflags, strategy)
    got = _final_params(tmp_path / "dist")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=1e-6, atol=1e-6, msg=k)


def test_killed_rank_restarts_and_matches_uninterrupted(tmp_path):
    args = ["--workload", "linreg", "-w", "dim=16", "--checkpoint-every-samples", str(32 * 4)]
    _torchrun(tmp_path, "clean", *args)
    r = _torchrun(tmp_path, "faulty", *args, max_restarts=1, env={"BIGBATCH_TEST_FAULT": "1:7"})
    assert "injected fault" in r.stderr + r.stdout
    a, b = _final_params(tmp_path / "clean"), _final_params(tmp_path / "faulty")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.multigpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["--ddp", "--fsdp"])
def test_two_gpus_nccl_equal_accumulation(tmp_path, strategy):
    """The same equality with NCCL on two GPUs (fp32: --no-amp), against one GPU accumulating."""
    cfg = TrainConfig(workload="linreg", workload_args={"dim": 16}, batch_size=32, micro_batch_size=16, lr=0.05,
                      optimizer="sgd", momentum=0.9, budget_samples=32 * 12, progress="none", device="cuda",
                      amp=False, out=str(tmp_path / "single"))
    ref = {k: v.cpu() for k, v in train(cfg).model.state_dict().items()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bigbatch",
           "train", *[c if c != "cpu" else "cuda" for c in COMMON], "--no-amp", "--workload", "linreg", "-w", "dim=16",
           strategy, "--out", str(tmp_path / "dist")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = _final_params(tmp_path / "dist")
    for k in ref:
        a, b = got[k].float().cpu(), ref[k].float().cpu()
        diff = (a - b).abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{k}: max diff {diff:.3g}")

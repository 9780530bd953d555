"""Two CPU processes under torchrun (gloo): DDP and FSDP2 equal single-process accumulation,
and a worker killed mid-run is restarted by torchrun and finishes where an uninterrupted run does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import spawn_gloo

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


# ---- FSDP2 with the noise monitor, the weight EMA and checkpoint averaging ---------------------------

FSDP_RUN = {"workload": "mnist1d", "workload_args": {"num_samples": 2000, "model": "mlp"}, "batch_size": 32, "lr": 0.05,
            "optimizer": "sgd", "momentum": 0.9, "budget_samples": 32 * 12, "eval_every_samples": 64,
            "checkpoint_every_samples": 64, "log_every_steps": 1, "progress": "none", "device": "cpu",
            "noise_scale": True, "ema_horizon_samples": 256, "average_last": 3}


def _trainer_worker(rank: int, out: str) -> dict:
    """Four runs in one pair of processes (torch is imported once): FSDP, DDP, FSDP stopped at step 5 and resumed;
    then the sharded EMA's non-finite check."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets them
    for name, kw in (("fsdp", {"fsdp": True}), ("ddp", {}), ("resumed", {"fsdp": True, "max_steps": 5}),
                     ("resumed", {"fsdp": True, "resume": True})):
        train(TrainConfig(**FSDP_RUN, **kw, out=str(Path(out) / name)))
    return _sharded_ema_nonfinite(rank)


def _sharded_ema_nonfinite(rank: int) -> dict:
    """A NaN in rank 1's shard only: both ranks skip (or raise) together; a full state loads back into shards."""
    from torch.distributed.fsdp import fully_shard

    from bigbatch.averaging import EMA

    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    net = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)), mesh=init_device_mesh("cpu", (2,)))
    skip, strict = EMA(net, horizon_samples=8, on_nonfinite="skip"), EMA(net, horizon_samples=8)
    full = skip.state_dict()["shadow"]  # a collective
    with torch.no_grad():
        net[0].weight.to_local().add_(1.0)
        if rank == 1:
            net[0].weight.to_local()[0, 0] = float("nan")
    skip.update(net, 4)
    try:
        strict.update(net, 4)
        raised = ""
    except ValueError as e:
        raised = str(e)
    after = skip.state_dict()["shadow"]
    res = {"unchanged": all(torch.equal(full[k], after[k]) for k in full), "skipped": skip.skipped, "raised": raised}
    with torch.no_grad():
        net[0].weight.to_local().fill_(2.0)
    skip.update(net, 4)  # a finite step moves the average
    moved = skip.state_dict()["shadow"]
    skip.load_state_dict({**skip.state_dict(), "shadow": full})  # full tensors in, each rank keeps its shard
    res["moved"] = not torch.equal(moved["0.weight"], full["0.weight"])
    res["reloaded"] = all(torch.equal(skip.state_dict()["shadow"][k], full[k]) for k in full)
    return res


def _close(a: float | None, b: float | None, rel: float) -> bool:
    """Equal within ``rel``, or both missing (JSON writes a nan estimate as null)."""
    return (a is None and b is None) or (a is not None and b is not None and a == pytest.approx(b, rel=rel))


def test_fsdp_noise_ema_and_average_match_ddp_and_resume(tmp_path):
    import json

    from bigbatch.train.metrics import read_metrics

    ema_checks = spawn_gloo(_trainer_worker, str(tmp_path))
    runs = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in ("fsdp", "ddp", "resumed")}
    fs, dd = runs["fsdp"], runs["ddp"]
    assert (fs["parallel"], fs["noise_mode"], dd["parallel"], dd["noise_mode"]) == ("fsdp", "fsdp", "ddp", "ddp")
    # no accumulation: FSDP mode reads what DDP mode reads (each rank's 16 examples vs the 32)
    assert fs["b_simple"] > 0 and fs["b_simple"] == pytest.approx(dd["b_simple"], rel=1e-4)
    mets = {n: read_metrics(tmp_path / n / "metrics.jsonl") for n in runs}
    train_f = [r for r in mets["fsdp"] if r["kind"] == "train"]
    train_d = [r for r in mets["ddp"] if r["kind"] == "train"]
    assert len(train_f) == 12 and all(r["b_simple"] is not None for r in train_f[-3:])  # nan while the |G|² EMA is <= 0
    assert all(_close(a["b_simple"], b["b_simple"], 1e-4) for a, b in zip(train_f, train_d))
    # the EMA (kept as shards under FSDP) is evaluated and equals DDP's unsharded EMA
    ema_key = f"ema_{fs['metric_name']}"
    evals_f = [r for r in mets["fsdp"] if r["kind"] == "eval"]
    evals_d = [r for r in mets["ddp"] if r["kind"] == "eval"]
    assert len(evals_f) == 7 and all(ema_key in r for r in evals_f)
    assert [r[ema_key] for r in evals_f] == pytest.approx([r[ema_key] for r in evals_d], rel=1e-5)
    assert fs["ema_metric"] == pytest.approx(dd["ema_metric"], rel=1e-5)
    last = {n: torch.load(latest_checkpoint(tmp_path / n / "checkpoints"), weights_only=False) for n in runs}
    for k in last["ddp"]["model"]:
        torch.testing.assert_close(last["fsdp"]["model"][k], last["ddp"]["model"][k], rtol=1e-6, atol=1e-6)
    for k, v in last["ddp"]["ema"]["shadow"].items():
        assert not hasattr(last["fsdp"]["ema"]["shadow"][k], "to_local"), "EMA saved as shards"
        torch.testing.assert_close(last["fsdp"]["ema"]["shadow"][k], v, rtol=1e-6, atol=1e-6)
    # averaged.pt: the mean of the last three full-state checkpoints, evaluated
    ckpts = sorted((tmp_path / "fsdp" / "checkpoints").glob("ckpt_*.pt"))[-3:]
    assert fs["averaged_checkpoints"] == [p.name for p in ckpts] == ["ckpt_00000008.pt", "ckpt_00000010.pt", "ckpt_00000012.pt"]
    avg = torch.load(tmp_path / "fsdp" / "averaged.pt", weights_only=True)
    models = [torch.load(p, weights_only=False)["model"] for p in ckpts]
    for k in avg:
        ref = sum(m[k].double() for m in models) / 3
        torch.testing.assert_close(avg[k].double(), ref, rtol=1e-6, atol=1e-7)
    assert fs["averaged_metric"] == pytest.approx(dd["averaged_metric"], rel=1e-5)
    # stopped at step 5 and resumed: the same metrics (noise scale, EMA metric) and the same final EMA
    re = runs["resumed"]
    assert re["resumed_from"].endswith("ckpt_00000005.pt")
    strip = [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_s")} for r in mets["resumed"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_s")} for r in mets["fsdp"]]
    for k, v in last["fsdp"]["ema"]["shadow"].items():
        torch.testing.assert_close(last["resumed"]["ema"]["shadow"][k], v, rtol=0, atol=0)
    assert re["averaged_metric"] == fs["averaged_metric"] and re["ema_metric"] == fs["ema_metric"]
    # the sharded EMA's non-finite check is taken over all ranks
    r0, r1 = ema_checks
    for r in (r0, r1):
        assert r["unchanged"] and r["skipped"] == 1 and r["moved"] and r["reloaded"]
    assert "another rank's shard" in r0["raised"] and "'0.weight' has NaN" in r1["raised"]


def _average_worker(rank: int, out: str) -> dict:
    """DDP with checkpoint averaging while rank 0 writes its checkpoints slowly."""
    import time

    import bigbatch.train.loop as loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    save = loop.save_atomic

    def slow(obj, path):  # a slow disk: a rank that did not wait for rank 0 lists an older set of files
        time.sleep(0.5)
        save(obj, path)

    loop.save_atomic = slow
    cfg = TrainConfig(workload="linreg", workload_args={"dim": 8}, batch_size=32, lr=0.05, optimizer="sgd",
                      budget_samples=32 * 6, checkpoint_every_samples=64, average_last=2, progress="none", device="cpu",
                      out=out)
    s = train(cfg).summary
    return {"names": s["averaged_checkpoints"], "metric": s["averaged_metric"]}


def test_ddp_ranks_average_the_same_checkpoints(tmp_path):
    """Under DDP every rank averages the last checkpoints itself: only after rank 0 has written the final one
    and deleted the old ones (it once read a list with a deleted file: FileNotFoundError on rank 1)."""
    r0, r1 = spawn_gloo(_average_worker, str(tmp_path))
    assert r0["names"] == r1["names"] == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    assert r0["metric"] == r1["metric"]

"""Final weights vs checkpoint averaging vs EMA on MNIST-1D (CPU, a couple of minutes).

Part A — the trainer: ``bigbatch.train.train`` writes checkpoints every ``--ckpt-every``
samples and keeps the last N; their average (``average_checkpoints``) is evaluated next to
the final weights.

Part B — a small loop over the Workload API (build_model, sampler, fetch, loss, evaluate)
at two batch sizes, with a weight EMA whose horizon is given in samples (``EMA(...,
horizon_samples=H)``: per-step decay exp(-B/H), Busbridge et al. 2023) next to an EMA with a
fixed per-step decay tuned at the smaller batch and *not* rescaled, whose horizon in samples
grows with the batch. The average of the last N snapshots is reported too.

    python benchmarks/averaging_eval.py [--seeds 3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bigbatch.averaging import EMA, average_checkpoints, last_checkpoints
from bigbatch.optim import create_optimizer
from bigbatch.train import TrainConfig, train
from bigbatch.workloads import load_workload

WL_ARGS = {"num_samples": 10_000}


def part_a(seed: int, epochs: float, n_avg: int, schedule: str, out: Path) -> tuple[float, float]:
    wl = load_workload("mnist1d", **WL_ARGS)
    every = wl.dataset_size // 4
    cfg = TrainConfig(
        workload="mnist1d", workload_args=WL_ARGS, batch_size=128, lr=0.1, budget_samples=int(epochs * wl.dataset_size),
        eval_every_samples=every, checkpoint_every_samples=every, keep_checkpoints=n_avg, schedule=schedule,
        seed=seed, progress="none", out=str(out),
    )
    res = train(cfg, workload=wl)
    final = float(wl.evaluate(res.model.eval(), torch.device("cpu")))
    res.model.load_state_dict(average_checkpoints(last_checkpoints(out / "checkpoints", n_avg)))
    return final, float(wl.evaluate(res.model.eval(), torch.device("cpu")))


def part_b(seed: int, epochs: float, batch_size: int, lr: float, horizon: float, step_decay: float, n_avg: int) -> dict[str, float]:
    wl = load_workload("mnist1d", **WL_ARGS)
    torch.manual_seed(seed)
    model = wl.build_model()
    opt = create_optimizer("sgd", model, lr=lr, momentum=0.9)
    sampler = wl.sampler(seed)
    scaled = EMA(model, horizon_samples=horizon)
    unscaled = EMA(model, decay=step_decay, batch_size=batch_size)  # a per-step decay, used as is
    snap_every = wl.dataset_size // 4
    snapshots: list[dict[str, torch.Tensor]] = []
    budget, samples = int(epochs * wl.dataset_size), 0
    while samples < budget:
        batch = wl.fetch(sampler.next(batch_size))
        loss_sum, count = wl.loss(model, batch)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += batch_size
        scaled.update(model, batch_size)
        unscaled.update(model, batch_size)
        if samples // snap_every != (samples - batch_size) // snap_every:
            snapshots = (snapshots + [{k: v.clone() for k, v in model.state_dict().items()}])[-n_avg:]
    dev = torch.device("cpu")
    model.eval()
    out = {"final": float(wl.evaluate(model, dev))}
    with scaled.applied(model):
        out["ema_scaled"] = float(wl.evaluate(model, dev))
    with unscaled.applied(model):
        out["ema_unscaled"] = float(wl.evaluate(model, dev))
    model.load_state_dict(average_checkpoints(snapshots))
    out["avg"] = float(wl.evaluate(model, dev))
    return out


def fmt(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--n-avg", type=int, default=5, help="checkpoints (snapshots every 1/4 epoch) to average")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    print(f"# MNIST-1D (num_samples=10000, CNN), test accuracy %, mean ± sd over {args.seeds} seeds, {args.epochs:g} epochs\n")
    print("## A. trainer (batch 128, SGD lr 0.1, momentum 0.9), checkpoints every 1/4 epoch\n")
    print(f"| schedule | final weights | average of last {args.n_avg} checkpoints |")
    print("|---|---:|---:|")
    for schedule in ("constant", "cosine"):
        finals, avgs = [], []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as d:
                f, a = part_a(seed, args.epochs, args.n_avg, schedule, Path(d))
            finals.append(f)
            avgs.append(a)
        print(f"| {schedule} | {fmt(finals)} | {fmt(avgs)} |")
    horizon = 2000.0  # samples: e-folding time of the EMA (1/4 epoch)
    base_b = 32
    step_decay = float(torch.tensor(-base_b / horizon).exp())  # the same EMA at batch 32, as a per-step decay
    print(f"\n## B. own loop (SGD, momentum 0.9, constant lr), EMA horizon {horizon:g} samples\n")
    print(f"EMA (per-sample): decay exp(-B/{horizon:g}) per step. EMA (per-step {step_decay:.4f}): tuned at batch {base_b}, not rescaled.\n")
    print(f"| batch | lr | final weights | average of last {args.n_avg} snapshots | EMA (per-sample horizon) | EMA (per-step {step_decay:.4f}, unscaled) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch_size, lr in ((32, 0.05), (512, 0.2)):
        rows: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            for k, v in part_b(seed, args.epochs, batch_size, lr, horizon, step_decay, args.n_avg).items():
                rows.setdefault(k, []).append(v)
        print(f"| {batch_size} | {lr:g} | {fmt(rows['final'])} | {fmt(rows['avg'])} | {fmt(rows['ema_scaled'])} | {fmt(rows['ema_unscaled'])} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

"""Trainer overhead: ``bigbatch.train`` step time vs a bare PyTorch loop doing the same work.

Both run ``bytelm`` at GPT-2-small shape (12 layers, d=768, context 1024) in bf16 autocast with
fused AdamW, the same batch split into the same micro-batches. The bare loop is the nanoGPT
shape: fetch, forward, backward, step, zero_grad, no logging. The trainer's step time is the
fastest of its own ``step_time`` records (intervals of ``--log-every`` steps, the first dropped),
the bare loop's likewise.

    python benchmarks/trainer_overhead.py --steps 60 --batch-size 32 --micro-batch-size 16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics
from bigbatch.workloads import load_workload, move_batch

DEVICE = "cuda"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(wl, batch: int, micro: int, steps: int, warmup: int, device: torch.device, lr: float, log_every: int) -> float:
    """The fastest interval of ``log_every`` steps (time per step), as the trainer reports it.

    The minimum, not the median: on a shared host the step time of both loops swings by ±15%
    between intervals, and interference only ever adds time (docs in BENCHMARKS.md)."""
    torch.manual_seed(0)
    model = wl.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95), fused=device.type == "cuda")
    sampler = wl.sampler(0)
    intervals = []
    for step in range(warmup + steps):
        if step >= warmup and (step - warmup) % log_every == 0:
            _sync(device)
            if step > warmup:
                intervals.append((time.perf_counter() - t0) / log_every)
            t0 = time.perf_counter()
        idx = sampler.next(batch)
        mbs = [move_batch(wl.fetch(idx[i : i + micro]), device) for i in range(0, batch, micro)]
        n = sum(wl.count(mb) for mb in mbs)
        for mb in mbs:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss_sum, _ = wl.loss(model, mb)
            (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    intervals.append((time.perf_counter() - t0) / log_every)
    return min(intervals)


def trainer_step_time(wl, batch: int, micro: int, steps: int, log_every: int, lr: float, extra: dict) -> float:
    out = tempfile.mkdtemp()
    cfg = TrainConfig(workload="bytelm", batch_size=batch, micro_batch_size=micro, lr=lr, optimizer="adamw",
                      weight_decay=0.1, optimizer_args={"betas": (0.9, 0.95), "fused": DEVICE == "cuda"},
                      warmup_samples=0, budget_samples=batch * steps * 1000, max_steps=steps,
                      eval_every_samples=10**12, checkpoint_every_samples=0, log_every_steps=log_every,
                      progress="none", device=DEVICE, out=out, **extra)
    train(cfg, workload=wl)
    times = [r["step_time"] for r in read_metrics(f"{out}/metrics.jsonl") if r.get("kind") == "train"][1:]
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 1-layer model on the CPU: checks the script, measures nothing")
    a = p.parse_args()
    global DEVICE
    if a.tiny:
        DEVICE = "cpu"
        wl = load_workload("bytelm", n_layer=1, d_model=32, n_head=2, context=32, max_bytes=200_000)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --tiny)")
        wl = load_workload("bytelm", size="gpt2-small")
    device = torch.device(DEVICE)
    lr = 6e-4
    rows = []
    for rep in range(a.repeats):
        bare = bare_loop(wl, a.batch_size, a.micro_batch_size, a.steps, 10, device, lr, a.log_every)
        tr = trainer_step_time(wl, a.batch_size, a.micro_batch_size, a.steps, a.log_every, lr, {})
        trn = trainer_step_time(wl, a.batch_size, a.micro_batch_size, a.steps, a.log_every, lr,
                                {"noise_scale": True})
        rows.append((bare, tr, trn))
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}")
    print(f"bytelm GPT-2-small, batch {a.batch_size} x context, micro {a.micro_batch_size}, bf16, fused AdamW")
    print("| repeat | bare loop ms/step | trainer ms/step | overhead | trainer + noise monitor ms/step | overhead |")
    print("|---|---|---|---|---|---|")
    for i, (b, t, n) in enumerate(rows):
        print(f"| {i} | {b*1e3:.1f} | {t*1e3:.1f} | {100*(t/b-1):+.2f}% | {n*1e3:.1f} | {100*(n/b-1):+.2f}% |")
    b = min(r[0] for r in rows); t = min(r[1] for r in rows); n = min(r[2] for r in rows)
    print(f"| best | {b*1e3:.1f} | {t*1e3:.1f} | {100*(t/b-1):+.2f}% | {n*1e3:.1f} | {100*(n/b-1):+.2f}% |")


if __name__ == "__main__":
    main()

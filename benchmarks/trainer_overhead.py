"""Trainer overhead: ``bigbatch.train`` step time vs a bare PyTorch loop doing the same work.

Both run ``bytelm`` at GPT-2-small shape (12 layers, d=768, context 1024) in bf16 autocast with
fused AdamW, the same batch split into the same micro-batches. The bare loop is the nanoGPT
shape: fetch, forward, backward, step, zero_grad, no logging.

Method (paired, because a shared GPU host drifts by ±10% over minutes, far more than the
effect measured): ``--pairs`` blocks, each one bare run and one trainer run back to back, the
order alternating (ABBA) so drift within a block cancels on average. A run's step time is the
median of its ``--log-every``-step intervals after ``--warmup`` steps (the trainer's own
``step_time`` records, the bare loop timed the same way with a device sync at each interval
end, as the trainer's logging does). The overhead is the median over blocks of
trainer / bare − 1, with the range of the middle half of the blocks; ``--noise`` adds a third
run per block with the noise monitor on (every 10th step).

    python benchmarks/trainer_overhead.py --pairs 8            # GPU
    python benchmarks/trainer_overhead.py --tiny               # CPU, minute model: the host cost per step
    python benchmarks/trainer_overhead.py --profile 3 --steps 20   # GPU: device idle time per step

``--profile`` removes the host's clock noise from the comparison: under torch.profiler it measures,
on the device's own timeline between the ends of consecutive optimizer steps, how long the GPU
was busy and how long it sat idle waiting for the host. Equal kernel counts and equal idle time
mean the trainer issues the same work and keeps the queue as full as the bare loop.

``--tiny`` runs a 1-layer, width-8 model on 8-byte windows on the CPU, where a step is almost all
host work (Python, data fetch, optimizer bookkeeping): the difference is then the trainer's own
per-step host cost, which a GPU run can hide behind the device's work but never reduce.
"""

from __future__ import annotations

import argparse
import statistics
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
    """Median time per step over intervals of ``log_every`` steps, after ``warmup`` steps."""
    torch.manual_seed(0)
    model = wl.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95), fused=device.type == "cuda")
    sampler = wl.sampler(0)
    intervals = []
    t0 = 0.0
    for step in range(warmup + steps + 1):
        if step >= warmup and (step - warmup) % log_every == 0:
            _sync(device)
            if step > warmup:
                intervals.append((time.perf_counter() - t0) / log_every)
            t0 = time.perf_counter()
        if step == warmup + steps:
            break
        idx = sampler.next(batch)
        mbs = [move_batch(wl.fetch(idx[i : i + micro]), device) for i in range(0, batch, micro)]
        n = sum(wl.count(mb) for mb in mbs)
        for mb in mbs:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss_sum, _ = wl.loss(model, mb)
            (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return statistics.median(intervals)


def trainer_step_time(wl, batch: int, micro: int, steps: int, warmup: int, log_every: int, lr: float, extra: dict) -> float:
    """Median of the trainer's own ``step_time`` records after ``warmup`` steps."""
    out = tempfile.mkdtemp()
    cfg = TrainConfig(workload="bytelm", batch_size=batch, micro_batch_size=micro, lr=lr, optimizer="adamw",
                      weight_decay=0.1, optimizer_args={"betas": (0.9, 0.95), "fused": DEVICE == "cuda"},
                      warmup_samples=0, budget_samples=batch * (steps + warmup) * 1000, max_steps=steps + warmup,
                      eval_every_samples=10**12, checkpoint_every_samples=0, log_every_steps=log_every,
                      progress="none", device=DEVICE, out=out, **extra)
    train(cfg, workload=wl)
    recs = [r for r in read_metrics(f"{out}/metrics.jsonl") if r.get("kind") == "train"]
    # A record at step s covers steps s-log_every+1 .. s; keep those wholly after the warm-up.
    times = [r["step_time"] for r in recs if r["step"] - log_every >= warmup]
    return statistics.median(times)


def _device_window(prof, skip: int) -> tuple[float, float, float, int]:
    """From a profile: per step after the first ``skip`` optimizer steps, the device-timeline span
    (ms), the busy time of kernels and copies in it (ms), their count; plus the steps counted.

    Steps are delimited by the ends of the GPU-side ``Optimizer.step#...`` annotations, so the span
    is what the device took from one step's end to the next: kernel time plus any idle gap that
    the host left (launch latency, syncs, Python work that the queue could not hide).
    """
    from torch.autograd import DeviceType

    evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    ann = sorted((e for e in evs if getattr(e, "is_user_annotation", False) and e.name.startswith("Optimizer.step#")),
                 key=lambda e: e.time_range.start)
    merged = []  # one range per step: nested or repeated annotations of the same step are merged
    for e in ann:
        a, b = e.time_range.start, e.time_range.end
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ann = merged
    if len(ann) <= skip:
        raise RuntimeError(f"profile has {len(ann)} GPU optimizer-step annotations, need > {skip}")
    t0, t1 = ann[skip - 1][1], ann[-1][1]
    n = len(ann) - skip
    busy, count = 0.0, 0
    for e in evs:
        if getattr(e, "is_user_annotation", False):
            continue
        a, b = max(e.time_range.start, t0), min(e.time_range.end, t1)
        if b > a:
            busy += b - a
            count += 1
    return (t1 - t0) / n / 1e3, busy / n / 1e3, count / n, n


def profile_compare(bare, trainer, rounds: int) -> None:
    """Bare loop vs trainer under torch.profiler: device span, kernel busy time and kernel count per step."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for r in range(rounds):
        for name, fn in (("bare", bare), ("trainer", trainer)) if r % 2 == 0 else (("trainer", trainer), ("bare", bare)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
            span, busy, count, n = _device_window(prof, skip=3)
            rows.append((r, name, span, busy, count, n))
            print(f"profile round {r} {name:8s}: span {span:7.2f} ms/step  kernels busy {busy:7.2f} ms  "
                  f"idle {span - busy:6.2f} ms  kernels/step {count:7.1f}  ({n} steps)", flush=True)
    print("\n| round | run | device span ms/step | kernel busy ms/step | idle ms/step | kernels/step |")
    print("|---|---|---|---|---|---|")
    for r, name, span, busy, count, _ in rows:
        print(f"| {r} | {name} | {span:.2f} | {busy:.2f} | {span - busy:.2f} | {count:.1f} |")
    for name in ("bare", "trainer"):
        sel = [x for x in rows if x[1] == name]
        print(f"{name}: median idle {statistics.median(x[2] - x[3] for x in sel):.3f} ms/step, median kernels/step "
              f"{statistics.median(x[4] for x in sel):.1f}, median busy {statistics.median(x[3] for x in sel):.2f} ms/step")


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps before timing starts in each run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--noise", action="store_true", help="also time the trainer with the noise monitor on")
    p.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                   help="instead of timing: ROUNDS profiled runs of each (device idle time and kernel count per step)")
    p.add_argument("--tiny", action="store_true", help="a minute model on the CPU: measures the host cost per step")
    a = p.parse_args()
    global DEVICE
    if a.tiny:
        DEVICE = "cpu"
        wl = load_workload("bytelm", n_layer=1, d_model=8, n_head=1, context=8, max_bytes=200_000)
        a.batch_size, a.micro_batch_size, a.steps, a.warmup, a.log_every = 4, 2, 300, 20, 10
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --tiny)")
        wl = load_workload("bytelm", size="gpt2-small")
    device = torch.device(DEVICE)
    lr = 6e-4
    bare = lambda: bare_loop(wl, a.batch_size, a.micro_batch_size, a.steps, a.warmup, device, lr, a.log_every)
    trainer = lambda **extra: trainer_step_time(wl, a.batch_size, a.micro_batch_size, a.steps, a.warmup, a.log_every, lr, extra)
    if a.profile:
        if DEVICE != "cuda":
            raise SystemExit("--profile needs a CUDA GPU")
        profile_compare(bare, trainer, a.profile)
        return
    rows = []
    for i in range(a.pairs):
        if i % 2 == 0:
            b = bare()
            t = trainer()
        else:
            t = trainer()
            b = bare()
        n = trainer(noise_scale=True) if a.noise else None
        rows.append((b, t, n))
        print(f"block {i}: bare {b*1e3:.2f} ms  trainer {t*1e3:.2f} ms  ({100*(t/b-1):+.2f}%)"
              + (f"  +noise {n*1e3:.2f} ms ({100*(n/b-1):+.2f}%)" if n is not None else ""), flush=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"\ndevice: {name}  torch {torch.__version__}")
    print(f"bytelm {'1x8, context 8 (CPU)' if a.tiny else 'GPT-2-small'}, batch {a.batch_size} x context, micro {a.micro_batch_size}, bf16, fused AdamW; "
          f"{a.pairs} blocks, {a.steps} timed steps per run after {a.warmup}")
    print("| block | bare loop ms/step | trainer ms/step | overhead |" + (" trainer + noise ms/step | overhead |" if a.noise else ""))
    print("|---|---|---|---|" + ("---|---|" if a.noise else ""))
    for i, (b, t, n) in enumerate(rows):
        line = f"| {i} | {b*1e3:.2f} | {t*1e3:.2f} | {100*(t/b-1):+.2f}% |"
        if n is not None:
            line += f" {n*1e3:.2f} | {100*(n/b-1):+.2f}% |"
        print(line)
    ratios = [t / b - 1 for b, t, _ in rows]
    lo, hi = _quartiles(ratios)
    print(f"\ntrainer overhead: median {100*statistics.median(ratios):+.2f}% over {len(rows)} blocks "
          f"(middle half {100*lo:+.2f}% .. {100*hi:+.2f}%); bare loop spread "
          f"{min(r[0] for r in rows)*1e3:.2f}-{max(r[0] for r in rows)*1e3:.2f} ms/step")
    if a.noise:
        nr = [n / b - 1 for b, _, n in rows]
        lo, hi = _quartiles(nr)
        print(f"trainer + noise monitor overhead: median {100*statistics.median(nr):+.2f}% "
              f"(middle half {100*lo:+.2f}% .. {100*hi:+.2f}%)")


if __name__ == "__main__":
    main()

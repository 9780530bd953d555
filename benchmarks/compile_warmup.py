"""Compiled trainer vs a bare compiled loop, window by window, in paired blocks.

Both run ``bytelm`` at GPT-2-small shape (context 1024) in bf16 autocast with fused LAMB under
``torch.compile``, batch ``--batch-size`` in micro-batches of ``--micro-batch-size``. Tokens per
second are printed for every ``--window`` steps, so a slow start (recompilation, a guard on a
value that changes during the first steps, a sync) shows as the windows where the two differ.

Method: ``--pairs`` blocks, each one bare run and one trainer run back to back, the order
alternating (ABBA), as in ``trainer_overhead.py``: a shared GPU host drifts by several percent
over minutes. Compilation falls in the first ``--discard`` steps, which are reported apart and
left out of the steady state; the steady-state figure of a run is the median of its windows
from step ``--discard`` on, and the overhead is the median over blocks of trainer / bare − 1.
The trainer runs with the workload's warmup, no checkpoints and, unless ``--eval-every`` is
given, no evaluation after the first; its tokens/s are its own metrics records (which leave
evaluation and checkpoint time out of the step time).

    TORCH_LOGS=recompiles python benchmarks/compile_warmup.py --pairs 4 --steps 100
    python benchmarks/compile_warmup.py --profile --steps 40      # device busy/idle and kernels per step

``--profile`` runs one bare and one trainer run under torch.profiler (after a warm-up run of each,
so compilation is cached) and prints, per step, the device span, the kernel busy time, the idle
time and the kernel count, as ``trainer_overhead.py --profile`` does, plus the CUDA kernels whose
count per step differs between the two.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bigbatch.optim import LAMB, param_groups
from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics
from bigbatch.workloads import load_workload, move_batch


def bare(wl, a) -> list[float]:
    """Tokens/s per window of a nanoGPT-shaped compiled loop (fetch, forward, backward, step, zero_grad)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = wl.build_model().to(dev)
    fwd = torch.compile(model)
    opt = LAMB(param_groups(model, weight_decay=0.1), lr=a.lr)
    sampler = wl.sampler(0)
    rates, t0, tokens = [], time.perf_counter(), 0
    for step in range(1, a.steps + 1):
        idx = sampler.next(a.batch_size)
        n = a.batch_size * wl.cfg.context
        for i in range(0, a.batch_size, a.micro_batch_size):
            mb = move_batch(wl.fetch(idx[i : i + a.micro_batch_size]), dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = wl.loss(fwd, mb)
            (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n
        if step % a.window == 0:
            float(loss.detach())  # one sync per window, as the trainer's logging
            t1 = time.perf_counter()
            rates.append(tokens / (t1 - t0))
            t0, tokens = t1, 0
    return rates


def trainer(wl, a) -> list[float]:
    out = tempfile.mkdtemp()
    cfg = TrainConfig(workload="bytelm", batch_size=a.batch_size, micro_batch_size=a.micro_batch_size, lr=a.lr,
                      optimizer="lamb", weight_decay=0.1, compile=True, budget_samples=a.batch_size * a.steps,
                      log_every_steps=a.window, progress="none", device="cuda", out=out,
                      eval_every_samples=a.eval_every * a.batch_size if a.eval_every else 10**12,
                      checkpoint_every_samples=0)
    train(cfg, workload=wl)
    return [r["tokens_per_s"] for r in read_metrics(f"{out}/metrics.jsonl") if r.get("kind") == "train"]


def profile_pair(wl, a) -> None:
    """Bare loop vs trainer under torch.profiler: where the trainer's extra time goes."""
    import collections

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from trainer_overhead import _device_window

    counts = {}
    for name, fn in (("bare", bare), ("trainer", trainer)):
        fn(wl, a)  # compile (cached for the profiled run)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(wl, a)
        span, busy, n_k, n = _device_window(prof, skip=5)
        print(f"{name:8s}: span {span:7.2f} ms/step  busy {busy:7.2f}  idle {span - busy:6.2f}  kernels/step {n_k:7.1f} ({n} steps)",
              flush=True)
        c = collections.Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
        counts[name] = {k: v / a.steps for k, v in c.items()}
    keys = set(counts["bare"]) | set(counts["trainer"])
    diff = sorted(((counts["trainer"].get(k, 0) - counts["bare"].get(k, 0), k) for k in keys), key=lambda x: -abs(x[0]))
    print("kernels whose count per step differs (trainer - bare):")
    for d, k in diff[:15]:
        if abs(d) >= 0.5:
            print(f"  {d:+7.1f}  {k[:110]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--discard", type=int, default=10, help="steps left out of the steady state (compilation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=0, help="trainer evaluates every N steps (0: only at the start)")
    p.add_argument("--profile", action="store_true", help="profile one run of each instead of timing pairs")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    wl = load_workload("bytelm", size="gpt2-small")
    if a.profile:
        profile_pair(wl, a)
        return
    first = a.discard // a.window
    blocks = []
    for i in range(a.pairs):
        order = ("bare", "trainer") if i % 2 == 0 else ("trainer", "bare")
        runs = {name: (bare if name == "bare" else trainer)(wl, a) for name in order}
        blocks.append(runs)
        for name in ("bare", "trainer"):
            print(f"block {i} {name:7s}", " ".join(f"{r/1e3:.0f}k" for r in runs[name]), flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}; batch {a.batch_size} x 1024 tokens, "
          f"micro {a.micro_batch_size}, fused LAMB, bf16, compile; windows of {a.window} steps; "
          f"steps 1-{a.discard} (compilation) discarded from the steady state")
    n = min(len(r) for b in blocks for r in b.values())
    print("| steps | bare tokens/s (median of blocks) | trainer tokens/s | trainer / bare − 1 (median of blocks) |")
    print("|---|---|---|---|")
    for w in range(n):
        bs = [b["bare"][w] for b in blocks]
        ts = [b["trainer"][w] for b in blocks]
        rs = [b["trainer"][w] / b["bare"][w] - 1 for b in blocks]
        print(f"| {w*a.window+1}-{(w+1)*a.window} | {statistics.median(bs)/1e3:.0f}k | {statistics.median(ts)/1e3:.0f}k | "
              f"{100*statistics.median(rs):+.1f}% |")
    ratios = [statistics.median(b["trainer"][first:]) / statistics.median(b["bare"][first:]) - 1 for b in blocks]
    print("steady-state trainer / bare − 1 per block: " + ", ".join(f"{100*r:+.2f}%" for r in ratios))
    print(f"steady-state overhead: median {100*statistics.median(ratios):+.2f}% over {len(ratios)} blocks")


if __name__ == "__main__":
    main()

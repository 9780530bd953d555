"""Compiled trainer vs a bare compiled loop, window by window: where does the trainer lose time?

Both run ``bytelm`` at GPT-2-small shape (context 1024) in bf16 autocast with fused LAMB under
``torch.compile``, batch ``--batch-size`` in micro-batches of ``--micro-batch-size``. Tokens per
second are printed for every ``--window`` steps, so a slow start (recompilation, a guard on a
value that changes during the first steps, a sync) shows as the windows where the two differ.
Variants of the trainer isolate the suspects: ``default`` (the workload's warmup, evaluations
and checkpoints), ``nowarmup`` (constant LR), ``noeval`` (no evaluation or checkpoint), ``plain``
(neither). Compilation (the first ``--discard`` steps) is reported apart and excluded from the
steady-state median, which is over windows from step ``--discard`` on.

    TORCH_LOGS=recompiles python benchmarks/compile_warmup.py --steps 160
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
            float(loss)  # one sync per window, as the trainer's logging
            t1 = time.perf_counter()
            rates.append(tokens / (t1 - t0))
            t0, tokens = t1, 0
    return rates


def trainer(wl, a, variant: str) -> list[float]:
    out = tempfile.mkdtemp()
    warm = None if variant in ("default", "noeval") else 0
    quiet = variant in ("noeval", "plain")
    cfg = TrainConfig(workload="bytelm", batch_size=a.batch_size, micro_batch_size=a.micro_batch_size, lr=a.lr,
                      optimizer="lamb", weight_decay=0.1, warmup_samples=warm, compile=True,
                      budget_samples=a.batch_size * a.steps, log_every_steps=a.window, progress="none",
                      device="cuda", out=out,
                      **({"eval_every_samples": 10**12, "checkpoint_every_samples": 0} if quiet else {}))
    train(cfg, workload=wl)
    return [r["tokens_per_s"] for r in read_metrics(f"{out}/metrics.jsonl") if r.get("kind") == "train"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--discard", type=int, default=10, help="steps excluded from the steady state (compilation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--variants", default="default,nowarmup,noeval,plain")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    wl = load_workload("bytelm", size="gpt2-small")
    runs = {"bare": bare(wl, a)}
    print("bare", [f"{r/1e3:.0f}k" for r in runs["bare"]], flush=True)
    for v in a.variants.split(","):
        runs[v] = trainer(wl, a, v)
        print(v, [f"{r/1e3:.0f}k" for r in runs[v]], flush=True)
    first = a.discard // a.window
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}; batch {a.batch_size} x 1024 tokens, "
          f"micro {a.micro_batch_size}, fused LAMB, bf16, compile; windows of {a.window} steps, the first {a.discard} discarded")
    print("| steps | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    n = min(len(r) for r in runs.values())
    for i in range(n):
        print(f"| {i*a.window+1}-{(i+1)*a.window} | " + " | ".join(f"{r[i]/1e3:.0f}k" for r in runs.values()) + " |")
    b = statistics.median(runs["bare"][first:])
    for name, r in runs.items():
        m = statistics.median(r[first:])
        print(f"{name}: steady median {m/1e3:.0f}k tokens/s ({100*(m/b-1):+.1f}% vs bare)")


if __name__ == "__main__":
    main()

"""What DDP's machinery costs per step, measured on ONE GPU (a one-rank process group).

Weak scaling of bytelm (BENCHMARKS.md) loses 10–20 ms per step going from one GPU to two,
while the gradient all-reduce itself takes ~1.2 ms. This probe separates the costs that do not
need a second GPU: the same model and step (GPT-2-small bytelm, bf16 autocast, 2 micro-batches
of 8 sequences, fused LAMB or fused AdamW) run as

* ``plain``: no DDP (the 1-GPU baseline of ``benchmarks/scaling.py``)
* ``ddp``: ``DistributedDataParallel`` at world size 1 (``no_sync`` on the first micro-batch),
  as the trainer wraps it; variants with ``gradient_as_bucket_view=True``,
  ``broadcast_buffers=False``, and with the trainer's per-step token-count all-reduce
* ``ddp+noise``: the noise monitor's DDP mode (communication hook) on top

each timed in interleaved rounds (median, CUDA-synchronised wall time per step), plus the host
time to *issue* a step (wall time until ``step()`` returns, without a sync): when that is close
to the step time the loop is bound by kernel launches, and any extra host work per step (DDP's
autograd hooks, Python) adds to the step time one for one.

    python benchmarks/ddp_overhead.py                    # GPU
    python benchmarks/ddp_overhead.py --tiny             # CPU (gloo) smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from bigbatch.noise import NoiseMonitor
from bigbatch.optim import create_optimizer
from bigbatch.workloads.bytelm import GPT, ByteLM, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--optimizer", default="lamb")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables for plain and ddp")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda:0" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, **({"device_id": device} if cuda else {}))
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=64, context=64) if a.tiny else GPTConfig.gpt2_small()
    if a.tiny:
        a.micro, a.steps, a.rounds = 2, 2, 2
    wl = ByteLM(context=cfg.context, max_bytes=8_000_000)
    gen = torch.Generator().manual_seed(0)
    pool = [{k: v.to(device) for k, v in wl.fetch(torch.randint(0, wl.dataset_size, (a.micro * a.accum,), generator=gen)).items()}
            for _ in range(4)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make(kind: str):
        torch.manual_seed(0)
        raw = GPT(cfg).to(device)
        model = raw
        mon = None
        if kind.startswith("ddp"):
            kw = {}
            if "bucketview" in kind:
                kw["gradient_as_bucket_view"] = True
            if "nobcast" in kind:
                kw["broadcast_buffers"] = False
            model = DDP(raw, device_ids=[0] if cuda else None, **kw)
            if "noise" in kind:
                mon = NoiseMonitor(model, mode="ddp", every=10)
        opt = create_optimizer(a.optimizer, raw, lr=1e-4, weight_decay=0.01)
        return model, opt, mon, "ncount" in kind

    def step(state, batch) -> None:
        model, opt, mon, ncount = state
        pieces = [{k: v[i * a.micro:(i + 1) * a.micro] for k, v in batch.items()} for i in range(a.accum)]
        n = sum(p["y"].numel() for p in pieces)
        if ncount:  # the trainer's per-step global token count: pinned, non-blocking, all-reduced on the device
            t = torch.tensor([float(n)], pin_memory=cuda)[0].to(device, non_blocking=True)
            dist.all_reduce(t)
            scale = 1.0 / t
        else:
            scale = 1.0 / n
        if mon is not None:
            mon.begin_step()
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            ctx = model.no_sync() if (hasattr(model, "no_sync") and not last) else torch.enable_grad()
            mctx = mon.micro_batch(p["y"].numel(), samples=p["y"].shape[0]) if mon is not None else torch.enable_grad()
            with ctx, mctx:
                with autocast():
                    logits = model(p["x"])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), p["y"].flatten(), reduction="sum")
                (loss * scale).backward()
        if mon is not None:
            mon.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    kinds = ["plain", "ddp", "ddp+bucketview", "ddp+nobcast", "ddp+ncount", "ddp+noise+ncount"]
    states = {k: make(k) for k in kinds}
    times = {k: [] for k in kinds}
    issue = {k: [] for k in kinds}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for k in kinds:  # warm-up
        for i in range(3):
            step(states[k], pool[i % 4])
    sync()
    for _ in range(a.rounds):
        for k in kinds:
            sync()
            t0 = time.perf_counter()
            for i in range(a.steps):
                t1 = time.perf_counter()
                step(states[k], pool[i % 4])
                issue[k].append(time.perf_counter() - t1)
            sync()
            times[k].append((time.perf_counter() - t0) / a.steps)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\nDDP overhead at world size 1: bytelm GPT-2-small ({cfg.n_layer}x{cfg.d_model}, ctx {cfg.context}), "
          f"{a.accum} x {a.micro} sequences, {a.optimizer} (fused on CUDA), {name}, torch {torch.__version__}")
    print(f"median of {a.rounds} interleaved rounds x {a.steps} steps")
    print(f"{'config':<20}{'step ms':>10}{'spread ms':>11}{'vs plain':>10}{'host issue ms':>15}")
    base = statistics.median(times["plain"])
    for k in kinds:
        med = statistics.median(times[k])
        print(f"{k:<20}{1e3*med:>10.2f}{1e3*(max(times[k])-min(times[k])):>11.2f}{100*(med/base-1):>+9.1f}%"
              f"{1e3*statistics.median(issue[k]):>15.2f}")
    if a.profile and cuda:
        from torch.profiler import ProfilerActivity, profile

        for k in ("plain", "ddp+noise+ncount"):
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(3):
                    step(states[k], pool[i % 4])
                sync()
            print(f"\n== profile: {k} (3 steps) ==")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

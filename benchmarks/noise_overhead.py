"""Step time with and without NoiseMonitor on bytelm (GPT-2-small shape, bf16 autocast), every mode.

A bare loop (no trainer): forward/backward over micro-batches with the loss normalised by the
step's token count, fused AdamW. Every mode is timed measuring every step (``/1``) and one step
in ten (``/10``, the trainer's default cadence on CUDA), against its own baseline:

* ``accum``: 4 micro-batches per step, no monitor; ``accum+micro`` (per-parameter hooks) and
  ``accum+prefix`` (one fused norm per micro-batch) in accumulation mode;
* ``single``: one micro-batch per step, no monitor; ``split+micro`` and ``split+prefix`` (2 pieces
  on measured steps; unmeasured steps run the batch whole);
* ``ddp``, ``fsdp``: the single configuration on a DDP model / an FSDP2 (``fully_shard``) model in
  a one-process group, bare and with the monitor in ``"ddp"`` / ``"fsdp"`` mode. With one rank the
  small and big batch coincide, so these give no estimate (and warn once); the cost of reading
  is what is measured (the ``G + 3``-float all-reduce of several ranks is not).

The non-distributed configurations share one model and optimizer (each has its own monitor, whose
hooks live only inside its measured steps), as do the FSDP ones; DDP takes one comm hook per
model, so each DDP configuration has its own. The
configurations run in interleaved rounds so clock drift hits all of them alike; each round is a
multiple of 10 steps, so ``/10`` configurations measure the same number of steps in every round.
Reported: the median over rounds (CUDA-synchronised wall time), the warm-up steps discarded per
configuration (compilation happens there), and the graphs dynamo compiled during the timed rounds
(should be 0: a recompilation in the timed rounds would be in the figure). ``--compile`` uses
``dynamic=False`` unless ``--dynamic auto``: split mode alternates two batch shapes, which under
torch's default turns on a dynamic batch dimension for every step.

    python benchmarks/noise_overhead.py                       # GPU, GPT-2 small, context 1024
    python benchmarks/noise_overhead.py --compile
    python benchmarks/noise_overhead.py --tiny                # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

from bigbatch.noise import NoiseMonitor
from bigbatch.workloads.bytelm import GPT, ByteLM, GPTConfig

A, S = "accumulation", "split"
# name: (model kind, mode, source, every, micro-batch shape: "accum" or "single")
CONFIGS = {
    "accum": ("local", None, "micro", 1, "accum"),
    "accum+micro/1": ("local", A, "micro", 1, "accum"),
    "accum+micro/10": ("local", A, "micro", 10, "accum"),
    "accum+prefix/1": ("local", A, "prefix", 1, "accum"),
    "accum+prefix/10": ("local", A, "prefix", 10, "accum"),
    "single": ("local", None, "micro", 1, "single"),
    "split+micro/1": ("local", S, "micro", 1, "single"),
    "split+micro/10": ("local", S, "micro", 10, "single"),
    "split+prefix/1": ("local", S, "prefix", 1, "single"),
    "split+prefix/10": ("local", S, "prefix", 10, "single"),
    "split+micro/50": ("local", S, "micro", 50, "single"),
    "split+prefix/50": ("local", S, "prefix", 50, "single"),
    "ddp": ("ddp", None, "micro", 1, "single"),
    "ddp+hook/1": ("ddp", "ddp", "micro", 1, "single"),
    "ddp+hook/10": ("ddp", "ddp", "micro", 10, "single"),
    "fsdp": ("fsdp", None, "micro", 1, "single"),
    "fsdp+micro/1": ("fsdp", "fsdp", "micro", 1, "single"),
    "fsdp+micro/10": ("fsdp", "fsdp", "micro", 10, "single"),
}


def baseline_of(name: str) -> str | None:
    if "+" not in name:
        return None
    head = name.split("+")[0]
    return "single" if head == "split" else head


def graphs_compiled() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=16, help="sequences per micro-batch (accumulation configs)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per step (accumulation configs)")
    ap.add_argument("--single", type=int, default=32, help="sequences per step (single/split/ddp/fsdp configs)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (a multiple of 10)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10, help="steps discarded per config before timing (a multiple of 10)")
    ap.add_argument("--log-every", type=int, default=10, help="read the reading every N steps (a logging trainer's sync)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dynamic", choices=["false", "auto"], default="false",
                    help="with --compile: dynamic=False (one static graph per batch shape) or torch's default "
                         "(auto: a second shape recompiles the model with a dynamic batch dimension)")
    ap.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--no-dist", action="store_true", help="skip the ddp and fsdp configurations")
    ap.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    args = ap.parse_args()
    for flag in ("steps", "warmup"):
        if getattr(args, flag) <= 0 or getattr(args, flag) % 10:
            ap.error(f"--{flag} must be a positive multiple of 10 (so that /10 configs measure equally often), "
                     f"got {getattr(args, flag)}")

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops drown in intra-op threading on a shared CPU
        cfg = GPTConfig(n_layer=2, n_head=2, d_model=64, context=64)
        args.micro, args.single, args.rounds = 4, 8, min(args.rounds, 2)
    else:
        cfg = GPTConfig.gpt2_small(context=args.context)
    configs = dict(CONFIGS)
    if args.configs:
        keep = args.configs.split(",")
        unknown = sorted(set(keep) - set(CONFIGS))
        if unknown:
            ap.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
        configs = {k: v for k, v in configs.items() if k in keep}
    if args.no_dist:
        configs = {k: v for k, v in configs.items() if v[0] == "local"}

    wl = ByteLM(context=cfg.context, max_bytes=8_000_000)
    gen = torch.Generator().manual_seed(0)
    n_seq = max(args.micro * args.accum, args.single)
    pool = [wl.fetch(torch.randint(0, wl.dataset_size, (n_seq,), generator=gen)) for _ in range(4)]
    pool = [{k: v.to(device) for k, v in b.items()} for b in pool]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    kinds = {c[0] for c in configs.values()}
    if kinds & {"ddp", "fsdp"}:  # a one-process group: the modes' code paths, without other ranks
        init = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=0, world_size=1)

    def build(kind: str):
        torch.manual_seed(0)
        raw = GPT(cfg).to(device)
        if kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (1,))
            for block in raw.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(raw, mesh=mesh)
        opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=cuda)
        if args.compile:  # as the trainer: compile, then DDP
            model = torch.compile(raw, dynamic=False if args.dynamic == "false" else None)
        else:
            model = raw
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[device.index] if cuda else None)
        return raw, model, opt

    def key(name: str) -> str:  # DDP takes one comm hook per model: a DDP model per DDP config
        kind = configs[name][0]
        return name if kind == "ddp" else kind

    models = {key(name): build(configs[name][0]) for name in configs}
    monitors = {}
    for name, (kind, mode, source, every, _) in configs.items():
        if mode is not None:
            raw, model, _ = models[key(name)]
            monitors[name] = NoiseMonitor(model if kind == "ddp" else raw, mode=mode, source=source, every=every)

    def step(name: str, batch: dict) -> object:
        kind, _, _, _, shape = configs[name]
        _, model, opt = models[key(name)]
        mon = monitors.get(name)
        size, k = (args.micro, args.accum) if shape == "accum" else (args.single, 1)
        pieces = [{kk: v[i * size : (i + 1) * size] for kk, v in batch.items()} for i in range(k)]
        if mon is not None:
            pieces = [p for piece in pieces for p in mon.split_batch(piece)]  # split mode: measured steps only
            mon.begin_step()
        n_total = sum(p["y"].numel() for p in pieces)
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            sync = model.no_sync() if kind == "ddp" and not last else contextlib.nullcontext()
            ctx = mon.micro_batch(p["y"].numel(), samples=p["y"].shape[0]) if mon is not None else contextlib.nullcontext()
            with sync, ctx:
                with autocast():
                    logits = model(p["x"])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), p["y"].flatten(), reduction="sum")
                (loss / n_total).backward()
        reading = mon.end_step() if mon is not None else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return reading

    times: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, dict] = {}
    counters = {name: 0 for name in configs}
    compiled_in_timing = {name: 0 for name in configs}

    def timed(name: str, n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            r = step(name, pool[counters[name] % len(pool)])
            counters[name] += 1
            if r is not None and counters[name] % args.log_every == 0:
                last[name] = r.as_dict()  # the host sync a logging trainer pays
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    t_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NoiseMonitor: a step with one micro-batch")  # ddp/fsdp on one rank
        for name in configs:
            timed(name, args.warmup)
        t_warm = time.perf_counter() - t_start
        for _ in range(args.rounds):
            for name in configs:
                before = graphs_compiled()
                times[name].append(timed(name, args.steps))
                compiled_in_timing[name] += graphs_compiled() - before
    t_total = time.perf_counter() - t_start

    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\nnoise monitor overhead: bytelm GPT n_layer={cfg.n_layer} d_model={cfg.d_model} context={cfg.context}, "
          f"{'bf16 autocast' if cuda else 'fp32'}, {dev_name}, torch {torch.__version__}, "
          f"compile={('dynamic=' + args.dynamic) if args.compile else 'off'}")
    print(f"accum: {args.accum} x {args.micro} sequences; single/split/ddp/fsdp: {args.single} sequences; "
          f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} discarded warm-up steps per config; "
          f"reading read every {args.log_every} steps; warm-up {t_warm:.0f} s, total {t_total:.0f} s")
    print(f"{'config':<18}{'warm-up':>9}{'step ms':>10}{'spread ms':>11}{'overhead':>10}{'recompiles':>12}"
          f"{'b_simple (tok)':>16}")
    for name in configs:
        med = statistics.median(times[name])
        spread = max(times[name]) - min(times[name])
        base = baseline_of(name)
        over = f"{100 * (med / statistics.median(times[base]) - 1):+.2f}%" if base in times else ""
        b = last.get(name, {}).get("b_simple")
        b_txt = "" if b is None or b != b else f"{b:.4g}"
        print(f"{name:<18}{args.warmup:>9}{1e3 * med:>10.2f}{1e3 * spread:>11.2f}{over:>10}"
              f"{compiled_in_timing[name]:>12}{b_txt:>16}")
    if dist.is_initialized():
        dist.destroy_process_group()
        os.unlink(init)


if __name__ == "__main__":
    main()

"""Step time with and without NoiseMonitor on bytelm (GPT-2-small shape, bf16 autocast).

A bare loop (no trainer): forward/backward over micro-batches with the loss normalised by the
step's token count, fused AdamW. Configurations, timed in interleaved rounds so clock drift
hits all of them alike (median over rounds, CUDA events):

* ``accum``: 4 micro-batches per step, no monitor, against accumulation mode with
  ``source="micro"`` (per-parameter hooks) every step / every 10th step, with a per-module-type
  breakdown, and ``source="prefix"`` (one fused norm per micro-batch)
* ``single``: one micro-batch per step, no monitor, against split mode (2 pieces; this cost is
  mostly the smaller kernels of the pieces, which is why it is opt-in)

The loop reads the reading every ``--log-every`` steps, as a trainer logging metrics would.

    python benchmarks/noise_overhead.py                 # GPU, GPT-2 small, context 1024
    python benchmarks/noise_overhead.py --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bigbatch.noise import NoiseMonitor
from bigbatch.workloads.bytelm import GPT, ByteLM, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=16, help="sequences per micro-batch (accumulation configs)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per step (accumulation configs)")
    ap.add_argument("--single", type=int, default=32, help="sequences per step (single/split configs)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--configs", default="", help="comma-separated subset of the configs (default: all)")
    ap.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        cfg = GPTConfig(n_layer=2, n_head=2, d_model=64, context=64)
        args.micro, args.single, args.steps, args.rounds, args.warmup = 4, 8, 3, 2, 1
    else:
        cfg = GPTConfig.gpt2_small(context=args.context)
    wl = ByteLM(context=cfg.context, max_bytes=8_000_000)
    gen = torch.Generator().manual_seed(0)
    pool = [wl.fetch(torch.randint(0, wl.dataset_size, (max(args.micro * args.accum, args.single),), generator=gen)) for _ in range(4)]
    pool = [{k: v.to(device) for k, v in b.items()} for b in pool]

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))

    def make(mode: str | None, groups: str | None, source: str, every: int):
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        mon = NoiseMonitor(model, mode=mode, groups=groups, splits=2, source=source, every=every) if mode else None
        fwd = torch.compile(model) if args.compile else model
        return model, fwd, opt, mon

    def step(state, batch, micro_size: int, k: int) -> object:
        model, fwd, opt, mon = state
        pieces = [{kk: v[i * micro_size : (i + 1) * micro_size] for kk, v in batch.items()} for i in range(k)]
        if mon is not None and mon.mode == "split":
            pieces = [p for piece in pieces for p in mon.split_batch(piece)]
        n_total = sum(p["y"].numel() for p in pieces)
        reading = None
        if mon is not None:
            mon.begin_step()
        for p in pieces:
            ctx = mon.micro_batch(p["y"].numel(), samples=p["y"].shape[0]) if mon is not None else torch.enable_grad()
            with ctx:
                with autocast():
                    logits = fwd(p["x"])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), p["y"].flatten(), reduction="sum")
                (loss / n_total).backward()
        if mon is not None:
            reading = mon.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return reading

    A, S = ("accumulation", "split")
    configs = {  # name: (mode, groups, source, every, micro-batch size, micro-batches)
        "accum": (None, None, "micro", 1, args.micro, args.accum),
        "accum+micro": (A, None, "micro", 1, args.micro, args.accum),
        "accum+micro/10": (A, None, "micro", 10, args.micro, args.accum),
        "accum+micro+groups": (A, "module_type", "micro", 1, args.micro, args.accum),
        "accum+prefix": (A, None, "prefix", 1, args.micro, args.accum),
        "single": (None, None, "micro", 1, args.single, 1),
        "split+micro": (S, None, "micro", 1, args.single, 1),
        "split+prefix": (S, None, "prefix", 1, args.single, 1),
    }
    if args.configs:
        keep = args.configs.split(",")
        configs = {k: v for k, v in configs.items() if k in keep}
    states = {name: make(*c[:4]) for name, c in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, object] = {}
    counters = {name: 0 for name in configs}

    def timed(name: str, n: int) -> float:
        micro, k = configs[name][4:]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            r = step(states[name], pool[counters[name] % len(pool)], micro, k)
            counters[name] += 1
            if r is not None and counters[name] % args.log_every == 0:
                last[name] = r.as_dict()  # the host sync a logging trainer pays
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    for name in configs:
        timed(name, args.warmup)
    for _ in range(args.rounds):
        for name in configs:
            times[name].append(timed(name, args.steps))

    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\nnoise monitor overhead: bytelm GPT n_layer={cfg.n_layer} d_model={cfg.d_model} context={cfg.context}, "
          f"{'bf16 autocast' if cuda else 'fp32'}, {dev_name}, torch {torch.__version__}, compile={args.compile}")
    print(f"accum: {args.accum} x {args.micro} sequences; single/split: {args.single} sequences; "
          f"median of {args.rounds} rounds x {args.steps} steps; reading read every {args.log_every} steps")
    print(f"{'config':<22}{'step ms':>10}{'spread ms':>11}{'overhead':>10}{'b_simple (tokens)':>20}")
    base_of = {n: ("single" if n.startswith("split") else "accum") for n in configs if "+" in n}
    for name in configs:
        med = statistics.median(times[name])
        spread = max(times[name]) - min(times[name])
        base = base_of.get(name)
        over = f"{100 * (med / statistics.median(times[base]) - 1):+.2f}%" if base in times else ""
        b = last.get(name, {}).get("b_simple") if name in last else None
        print(f"{name:<22}{1e3 * med:>10.2f}{1e3 * spread:>11.2f}{over:>10}{'' if b is None else f'{b:.4g}':>20}")


if __name__ == "__main__":
    main()

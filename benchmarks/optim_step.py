"""Optimizer step time on parameter sets shaped like GPT-2 124M and GPT-2 XL 1.5B (CUDA).

    python benchmarks/optim_step.py                 # table: ms / step, effective GB/s
    python benchmarks/optim_step.py --check         # fused vs foreach parity after 100 steps (LR x0.1 at 50)
    python benchmarks/optim_step.py --sizes 124m    # one size only
    python benchmarks/optim_step.py --kernels       # device time per kernel of one fused step

Time = median of CUDA-event timings of single steps after warm-up (gradients fixed, so every
step does the same work). Effective GB/s counts the *minimum* bytes each algorithm must move
per float32 parameter (each input read once, each output written once, plus one re-read of
w and g or w, m, v where a per-tensor reduction must finish before the update):
SGD-momentum 20, AdamW 28, LARS 28, LAMB / MERIT 40 — shown next to the measured
device-to-device copy bandwidth (bytes read + written).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

MIN_BYTES = {"sgd": 20, "adamw": 28, "lars": 28, "lamb": 40, "merit": 40}


def gpt2_shapes(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


SIZES = {"124m": gpt2_shapes(768, 12), "1.5b": gpt2_shapes(1600, 48)}


def make_params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
        p.grad = torch.randn(s, device="cuda", generator=g, dtype=torch.float32).mul_(1e-3).to(dtype)
        ps.append(p)
    return ps


def groups(ps, wd):
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "adapt": False}]


def builders() -> dict[str, tuple[str, Callable]]:
    from bigbatch.optim import LAMB, LARS, MERIT

    b: dict[str, tuple[str, Callable]] = {
        "torch AdamW fused": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True)),
        "torch SGD mom. foreach": ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)),
    }
    for name, cls, kw, key in [
        ("LARS", LARS, dict(lr=1e-3, momentum=0.9), "lars"),
        ("LAMB", LAMB, dict(lr=1e-4), "lamb"),
        ("MERIT", MERIT, dict(lr=1e-4), "merit"),
    ]:
        for path in ("fused", "foreach"):
            b[f"bigbatch {name} {path}"] = (
                key, lambda ps, cls=cls, kw=kw, path=path, key=key: cls(
                    groups(ps, 1e-4 if key == "lars" else 0.01), **kw, nonfinite="skip",
                    fused=path == "fused", foreach=path == "foreach"),
            )
    b["MERIT per-tensor loop (official-style)"] = (
        "merit", lambda ps: MERIT(groups(ps, 0.01), lr=1e-4, foreach=False, fused=False, nonfinite="skip"))
    try:
        from timm.optim import Lamb, Lars

        b["timm Lamb"] = ("lamb", lambda ps: Lamb(ps, lr=1e-4, weight_decay=0.01))
        b["timm Lars"] = ("lars", lambda ps: Lars(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4))
    except Exception as e:  # timm is optional
        print(f"(timm not importable: {type(e).__name__}: {e}; its rows are skipped)", file=sys.stderr)
    return b


def time_steps(opt, warmup=5, iters=30) -> float:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        opt.step()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.float32, device="cuda")  # 4 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    del x, y
    return 2 * 4 * 2**30 / (statistics.median(ts) * 1e-3) / 1e9


def bench(sizes: list[str]) -> None:
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {bw:.0f} GB/s")
    rows = []
    for size in sizes:
        shapes = SIZES[size]
        n = sum(torch.Size(s).numel() for s in shapes)
        ref_ms = {}
        for label, (key, build) in builders().items():
            ps = make_params(shapes)
            # A per-tensor Python loop on 1.5B is slow; fewer iterations keep the run short.
            iters = 10 if ("loop" in label or "timm" in label) else 30
            try:
                opt = build(ps)
                ms = time_steps(opt, warmup=3, iters=iters)
            except Exception as e:  # report and go on: one broken row must not hide the others
                print(f"{size} {label}: FAILED {type(e).__name__}: {str(e)[:300]}")
                ms, opt = float("nan"), None
            ref_ms[label] = ms
            gbs = MIN_BYTES[key] * n / (ms * 1e-3) / 1e9
            rows.append((size, label, ms, gbs, gbs / bw))
            del opt, ps
            torch.cuda.empty_cache()
        ref_ms = {k: v for k, v in ref_ms.items() if v == v}
        ref_ms.setdefault("bigbatch LAMB fused", float("nan"))
        ref_ms.setdefault("bigbatch MERIT fused", float("nan"))
        ref_ms.setdefault("bigbatch LARS fused", float("nan"))
        adamw = ref_ms["torch AdamW fused"]
        sgd = ref_ms["torch SGD mom. foreach"]
        print(f"\n== {size}: {n / 1e6:.1f}M params ==")
        print(f"{'optimizer':40s} {'ms/step':>9s} {'eff GB/s':>9s} {'of copy':>8s} {'vs AdamW':>9s}")
        for s, label, ms, gbs, frac in rows:
            if s == size:
                print(f"{label:40s} {ms:9.3f} {gbs:9.0f} {frac:8.0%} {ms / adamw:8.2f}x")
        print(f"targets: fused LAMB {ref_ms['bigbatch LAMB fused'] / adamw:.2f}x AdamW (<=1.5), "
              f"fused MERIT {ref_ms['bigbatch MERIT fused'] / adamw:.2f}x (<=1.5), "
              f"fused LARS {ref_ms['bigbatch LARS fused'] / sgd:.2f}x SGD (<=1.2)"
              + (f", timm Lamb / fused LAMB {ref_ms['timm Lamb'] / ref_ms['bigbatch LAMB fused']:.1f}x (>=10)"
                 if "timm Lamb" in ref_ms else ""))


def check(sizes: list[str], steps: int = 100) -> int:
    from bigbatch.optim import LAMB, LARS, MERIT

    worst = 0.0
    print(f"{'size':6s} {'optimizer':24s} {'max rel err (per tensor)':>26s}")
    for size in sizes:
        for name, cls, kw in [
            ("LARS", LARS, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
            ("LARS nesterov+clip", LARS, dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True, clip=True)),
            ("LARS torch convention", LARS, dict(lr=0.05, momentum=0.9, weight_decay=1e-4, momentum_convention="torch")),
            ("LAMB", LAMB, dict(lr=1e-3, weight_decay=0.01)),
            ("LAMB clip+prenorm", LAMB, dict(lr=1e-3, weight_decay=0.01, trust_clip=(0.01, 10.0), grad_prenorm=1.0)),
            ("MERIT", MERIT, dict(lr=1e-3, weight_decay=0.01)),
        ]:
            pa, pb = make_params(SIZES[size], seed=1), make_params(SIZES[size], seed=1)
            wd = kw.pop("weight_decay")
            try:
                oa = cls(groups(pa, wd), **kw, fused=True)
                ob = cls(groups(pb, wd), **kw, foreach=True)
                gen = torch.Generator(device="cuda").manual_seed(5)
                for t in range(steps):
                    if t == steps // 2:  # an LR drop: where LARS's two momentum conventions part
                        for o in (oa, ob):
                            for g in o.param_groups:
                                g["lr"] *= 0.1
                    for a, b in zip(pa, pb):
                        g = torch.randn(a.shape, device="cuda", generator=gen).mul_(1e-2)
                        a.grad, b.grad = g, g.clone()
                    oa.step()
                    ob.step()
                err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(pa, pb))
            except Exception as e:
                print(f"{size} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                err, oa, ob = float("inf"), None, None
            worst = max(worst, err)
            print(f"{size:6s} {name:24s} {err:26.2e}")
            del pa, pb, oa, ob
            torch.cuda.empty_cache()
    ok = worst <= 1e-6
    print(f"worst {worst:.2e}: {'PASS' if ok else 'FAIL'} (target 1e-6 relative, fp32, {steps} steps)")
    return 0 if ok else 1


def kernel_breakdown(sizes: list[str], steps: int = 5) -> None:
    """Per kernel launch of one step (in launch order, averaged over ``steps``), from torch.profiler:
    which pass of a fused optimizer costs what, next to fused AdamW's single kernel."""
    from torch.profiler import ProfilerActivity, profile

    b = builders()
    for size in sizes:
        shapes = SIZES[size]
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n== {size}: {n / 1e6:.1f}M params: device time per kernel, one step (mean of {steps}) ==")
        for label in ("torch AdamW fused", "bigbatch LAMB fused", "bigbatch MERIT fused", "bigbatch LARS fused"):
            ps = make_params(shapes)
            opt = b[label][1](ps)
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    opt.step()
                torch.cuda.synchronize()
            evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                          and not getattr(e, "is_user_annotation", False)), key=lambda e: e.time_range.start)
            dur = [e.time_range.end - e.time_range.start for e in evs]  # µs
            per = len(evs) // steps
            print(f"{label}: {per} kernels/step, {sum(dur) / steps / 1e3:.3f} ms of kernels")
            for k in range(per):
                us = statistics.mean(dur[s * per + k] for s in range(steps))
                if us >= 5:  # the few-µs bookkeeping kernels (flag zeroing, counters) are left out
                    print(f"    {evs[k].name[:60]:60s} {us / 1e3:8.3f} ms")
            del opt, ps
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fused vs foreach parity instead of timing")
    ap.add_argument("--kernels", action="store_true", help="device time per kernel of one fused step")
    ap.add_argument("--sizes", default="124m,1.5b", help="comma list of: " + ", ".join(SIZES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",")]
    for s in sizes:
        if s not in SIZES:
            print(f"error: unknown size {s!r}; valid: {', '.join(SIZES)}", file=sys.stderr)
            return 2
    if args.check:
        return check(sizes)
    if args.kernels:
        kernel_breakdown(sizes)
        return 0
    bench(sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

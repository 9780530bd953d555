"""Cost of bigbatch's noise-scale callback inside HF Trainer and Lightning: paired runs of the examples.

Each block runs the example twice, with the callback and without it (``--no-noise``), the order
alternating (ABBA) so that drift of a shared host within a block cancels on average. A run's step
time is what the example prints (wall time over its steps after the first few, divided by their number: its
``StepTimer`` callback); the overhead of a block is with / without − 1, and the table gives the
median over blocks with the B_simple each run with the callback logged.

    python benchmarks/integrations_overhead.py --pairs 3            # GPU, bf16, the shapes below
    python benchmarks/integrations_overhead.py --pairs 1 --tiny     # CPU smoke run

GPU shapes: HF Trainer with GPT-2 small (12 × 768, context 1024, 8 sequences per device, 4
accumulation steps, 60 steps, a reading every 10 steps); Lightning with an 8-layer MLP of width
8192 (micro-batch 1024, 4 accumulation steps, 200 steps, a reading every 10 steps).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GPU = {
    "hf": ["examples/hf_trainer.py", "--gpu", "--bf16", "--n-layer", "12", "--n-embd", "768", "--seq", "1024",
           "--per-device-batch", "8", "--accum", "4", "--steps", "60", "--every", "10"],
    "lightning": ["examples/lightning_module.py", "--gpu", "--bf16", "--width", "8192", "--depth", "8",
                  "--micro-batch", "1024", "--accum", "4", "--steps", "200", "--every", "10"],
}
TINY = {
    "hf": ["examples/hf_trainer.py", "--steps", "12", "--every", "2"],
    "lightning": ["examples/lightning_module.py", "--steps", "40", "--every", "2"],
}
STEP = re.compile(r"step time ([0-9.]+) ms")
BSIMPLE = re.compile(r"b_simple \(logged[^)]*\): ([0-9.eE+-]+)")


def run(cmd: list[str]) -> tuple[float, float | None]:
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    m = STEP.search(p.stdout)
    if p.returncode != 0 or m is None:
        sys.exit(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    b = BSIMPLE.search(p.stdout)
    return float(m.group(1)), (float(b.group(1)) if b else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--frameworks", default="hf,lightning")
    ap.add_argument("--tiny", action="store_true", help="the examples' CPU defaults (a smoke run)")
    a = ap.parse_args()
    shapes = TINY if a.tiny else GPU
    rows = []
    for fw in a.frameworks.split(","):
        base = shapes[fw]
        overheads, logged, times = [], [], []
        for i in range(a.pairs):
            order = ("with", "without") if i % 2 == 0 else ("without", "with")
            res = {}
            for kind in order:
                res[kind] = run(base + (["--no-noise"] if kind == "without" else []))
            overheads.append(res["with"][0] / res["without"][0] - 1)
            times.append((res["with"][0], res["without"][0]))
            logged.append(res["with"][1])
            print(f"{fw} block {i}: with {res['with'][0]:.2f} ms, without {res['without'][0]:.2f} ms, "
                  f"overhead {100 * overheads[-1]:+.2f}%, logged b_simple {res['with'][1]}", flush=True)
        rows.append((fw, times, overheads, logged))
    print("\n| framework | blocks | step ms with / without (per block) | overhead per block | median overhead | logged B_simple |")
    print("|---|---|---|---|---|---|")
    for fw, times, ov, logged in rows:
        t = ", ".join(f"{w:.1f} / {wo:.1f}" for w, wo in times)
        o = ", ".join(f"{100 * x:+.1f}%" for x in ov)
        b = ", ".join("none" if v is None else f"{v:.3g}" for v in logged)
        print(f"| {fw} | {len(ov)} | {t} | {o} | **{100 * statistics.median(ov):+.2f}%** | {b} |")


if __name__ == "__main__":
    main()

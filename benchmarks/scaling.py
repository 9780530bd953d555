"""Weak scaling of ``bytelm`` at GPT-2-small shape under torchrun: per-GPU batch fixed.

For each GPU count N the command ``torchrun --nproc-per-node N -m bigbatch train --workload bytelm
-w size=gpt2-small ...`` runs with fused LAMB and the noise monitor on, and its tokens/s (median
of the logged intervals, the first dropped) is compared with N × the one-GPU figure.

    python benchmarks/scaling.py --gpus 1,2,4,8 --steps 40

``size=gpt2-small`` is context 1024. The defaults (32 sequences per GPU in micro-batches of 16)
keep each GPU busy with its own work: at 8 sequences per micro-batch the loop is bound by the
host issuing kernels (BENCHMARKS.md, DDP's per-step cost), and weak scaling then measures the
host, not the interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(n: int, per_gpu: int, micro: int, steps: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "bigbatch",
           "train", "--workload", "bytelm", "-w", "size=gpt2-small", "--optimizer", "lamb", "--lr", "2e-3",
           "--batch-size", str(per_gpu * n), "--micro-batch-size", str(micro), "--max-steps", str(steps),
           "--budget-samples", str(per_gpu * n * steps * 1000), "--warmup-samples", "0",
           "--eval-every-samples", str(10**12), "--checkpoint-every-samples", "0", "--log-every-steps", "5",
           "--progress", "none", "--device", "cuda", "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    if r.returncode:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"run with {n} GPU(s) failed")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x.get("kind") == "train"][1:]
    return {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in train),
            "step_time": statistics.median(x["step_time"] for x in train),
            "b_simple": train[-1].get("b_simple_samples", train[-1].get("b_simple"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="1,2", help="comma-separated GPU counts")
    p.add_argument("--per-gpu-batch", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--extra", default="--noise-scale", help="further bigbatch train flags")
    a = p.parse_args()
    counts = [int(x) for x in a.gpus.split(",")]
    rows = {n: run(n, a.per_gpu_batch, a.micro_batch_size, a.steps, a.extra.split()) for n in counts}
    base = rows[counts[0]]["tokens_per_s"] / counts[0]
    print(f"bytelm GPT-2-small, context 1024, {a.per_gpu_batch} sequences/GPU (micro {a.micro_batch_size}), "
          f"fused LAMB, bf16, flags: {a.extra}")
    print("| GPUs | tokens/s | step ms | efficiency | B_simple (last) |")
    print("|---|---|---|---|---|")
    for n, r in rows.items():
        eff = r["tokens_per_s"] / (n * base)
        b = "—" if r["b_simple"] is None else f"{r['b_simple']:.4g}"
        print(f"| {n} | {r['tokens_per_s']:,.0f} | {r['step_time']*1e3:.1f} | {100*eff:.1f}% | {b} |")


if __name__ == "__main__":
    main()

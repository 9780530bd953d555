"""Steps and samples to a target accuracy on MNIST-1D: fixed small, fixed large, adaptive batches.

The claim checked (issue 6): adaptive batch sizing (noise) reaches the target with fewer optimizer
steps than the fixed small batch and fewer samples than the fixed large batch. Every run uses the
same recipe (lr tuned at ``--base-batch``) moved to the running batch by ``--rule``; the adaptive
runs start at the small batch and may grow to the large one.

    PYTHONPATH=. python benchmarks/adaptive_mnist1d.py                 # all runs, 1 seed
    PYTHONPATH=. python benchmarks/adaptive_mnist1d.py --runs fixed-small,fixed-large --seeds 3
    PYTHONPATH=. python benchmarks/adaptive_mnist1d.py --arg noise:c=2 --arg ramp:ramp_samples=50000

Prints a markdown table (medians over seeds) and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics
from bigbatch.workloads import parse_workload_args

RUNS = ("fixed-small", "fixed-large", "noise", "normtest", "ramp")


def controller_args(name: str, small: int, large: int, eval_every: int) -> dict[str, Any]:
    """Default ``adaptive_args`` per controller; the trainer adds ``granularity`` itself."""
    common = {"min_batch": small, "max_batch": large, "growth": 2.0, "min_interval": eval_every}
    if name == "noise":
        return {"c": 1.0, **common}
    if name == "normtest":
        return {"eta": 1.0, **common}
    if name == "ramp":
        return {"start_batch": small, "end_batch": large, "increment": small, "ramp_samples": 100_000}
    raise ValueError(f"unknown run {name!r}; valid: {', '.join(RUNS)}")


def config_for(run: str, a: argparse.Namespace, seed: int, extra: dict[str, dict[str, Any]]) -> TrainConfig:
    base = dict(
        workload="mnist1d",
        workload_args=dict(a.workload_arg),
        target=a.target,
        rule=a.rule,
        base_batch_size=a.base_batch,
        budget_epochs=a.epochs,
        eval_every_samples=a.eval_every,
        checkpoint_every_samples=0,
        noise_scale=True,
        seed=seed,
        progress="none",
        out=str(Path(a.out) / f"{run}-s{seed}"),
    )
    if run == "fixed-small":
        return TrainConfig(batch_size=a.small, **base)
    if run == "fixed-large":
        return TrainConfig(batch_size=a.large, **base)
    args = {**controller_args(run, a.small, a.large, a.eval_every), **extra.get(run, {})}
    return TrainConfig(batch_size=a.small, adaptive=run, adaptive_args=args, **base)


def batch_trace(out: str) -> list[int]:
    """Batch sizes logged in ``metrics.jsonl`` (train records), to see whether the batch moved."""
    try:
        recs = read_metrics(Path(out) / "metrics.jsonl")
    except FileNotFoundError:
        return []
    return [int(r["batch_size"]) for r in recs if r.get("kind") == "train" and "batch_size" in r]


def median_or_none(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if len(vals) == len(xs) and vals else None


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--small", type=int, default=32, help="fixed small batch = adaptive start")
    p.add_argument("--large", type=int, default=1024, help="fixed large batch = adaptive max")
    p.add_argument("--base-batch", type=int, default=128, help="batch at which the workload's lr was tuned")
    p.add_argument("--rule", default="sqrt", help="LR scaling rule (linear, sqrt, none, ...)")
    p.add_argument("--target", type=float, default=0.9, help="target test accuracy")
    p.add_argument("--epochs", type=float, default=16.0, help="budget in epochs")
    p.add_argument("--eval-every", type=int, default=4000, help="evaluate every this many samples")
    p.add_argument("--seeds", type=int, default=1, help="seeds per run (medians are reported)")
    p.add_argument("--workload-arg", action="append", default=[], help="key=value for mnist1d (repeatable)")
    p.add_argument("--arg", action="append", default=[], help="RUN:key=value overriding a controller argument")
    p.add_argument("--out", default="runs/bench_adaptive", help="output directory")
    a = p.parse_args(argv)
    a.workload_arg = parse_workload_args(a.workload_arg)
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    for r in runs:
        if r not in RUNS:
            p.error(f"unknown run {r!r}; valid: {', '.join(RUNS)}")
    extra: dict[str, dict[str, Any]] = {}
    for item in a.arg:
        run, _, kv = item.partition(":")
        if run not in RUNS or "=" not in kv:
            p.error(f"--arg must be RUN:key=value with RUN in {', '.join(RUNS)}, got {item!r}")
        extra.setdefault(run, {}).update(parse_workload_args([kv]))

    results = []
    for run in runs:
        per_seed = []
        for seed in range(a.seeds):
            cfg = config_for(run, a, seed, extra)
            t0 = time.perf_counter()
            s = train(cfg).summary
            trace = batch_trace(cfg.out)
            per_seed.append(
                {
                    "seed": seed,
                    "reached_target": bool(s["reached_target"]),
                    "steps_to_target": s["steps_to_target"],
                    "samples_to_target": s["samples_to_target"],
                    "steps": s["steps"],
                    "samples": s["samples"],
                    "final_metric": s["final_metric"],
                    "batch_first": trace[0] if trace else cfg.batch_size,
                    "batch_last": trace[-1] if trace else cfg.batch_size,
                    "batch_changed": len(set(trace)) > 1,
                    "wall_seconds": time.perf_counter() - t0,
                }
            )
            print(f"# {run} seed {seed}: {json.dumps(per_seed[-1])}", file=sys.stderr, flush=True)
        results.append({"run": run, "config": cfg.to_dict(), "seeds": per_seed})

    print("| run | batch | reached | steps to target | samples to target | wall s |")
    print("|---|---|---|---|---|---|")
    notes = []
    for r in results:
        ss = r["seeds"]
        reached = sum(x["reached_target"] for x in ss)
        first, last = ss[0]["batch_first"], max(x["batch_last"] for x in ss)
        batch = str(first) if first == last else f"{first} → {last}"
        if r["run"] not in ("fixed-small", "fixed-large") and not any(x["batch_changed"] for x in ss):
            notes.append(f"{r['run']}: the batch never changed (is the controller wired into the trainer?)")
        print(
            f"| {r['run']} | {batch} | {reached}/{len(ss)} "
            f"| {fmt(median_or_none([x['steps_to_target'] for x in ss]))} "
            f"| {fmt(median_or_none([x['samples_to_target'] for x in ss]))} "
            f"| {statistics.median(x['wall_seconds'] for x in ss):.1f} |"
        )
    for n in notes:
        print(f"\nnote: {n}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

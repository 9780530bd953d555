"""Does a batch-size schedule from a multi-target study beat constant batches? (issue 20, item 4)

From a finished multi-target study (``bigbatch study --targets ...``) this derives the schedule
with ``bigbatch plan --study DIR --write-schedule``, then trains three arms to the study's hardest
target, each with the same seeds, optimizer, scaling rule and LR at the base batch as the
study's cells (the rule's LR, multiplier 1):

* ``schedule``: ``--batch-schedule`` with the plan's schedule (the LR moves by the rule at each
  batch change, as the adaptive controllers do);
* ``first``: a constant batch, the schedule's first batch size;
* ``last``: a constant batch, the schedule's last batch size.

Every arm evaluates at the cadence of the first batch size (so samples-to-target has the same
resolution in all three) and stops at the target or the study's budget. The table gives, per arm,
the median over seeds of the samples and the optimizer steps to the target, and the schedule
against the constant last batch: the goal of issue 20 is ≥ 20% fewer samples with ≤ 10% more
steps. ``--plot`` draws the metric against samples and against steps for every run.

    python benchmarks/schedule_validation.py --study runs/study-targets --seeds 0,1,2 --out runs/schedval
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bigbatch.adaptive.schedule import load_batch_schedule
from bigbatch.train import TrainConfig, train


def study_cell_config(study: Path) -> dict:
    """A cell's TrainConfig at LR multiplier 1 (the rule's LR): the settings every arm shares."""
    for cell in sorted((study / "cells").glob("*/cell.json")):
        spec = json.loads(cell.read_text())
        if float(spec["cell"]["lr_multiplier"]) == 1.0:
            return spec["train"]
    sys.exit(f"{study}: no cell at LR multiplier 1")


def metric_curve(run_dir: Path, name: str) -> list[tuple[int, int, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and name in rec:
            out.append((rec["step"], rec["samples"], rec[name]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True, type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--factor", type=float, default=1.0, help="bigbatch plan --factor")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plot", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    sched_file = a.out / "schedule.txt"
    sched_file.unlink(missing_ok=True)  # this script's own output from an earlier run
    plan = subprocess.run([sys.executable, "-m", "bigbatch", "plan", "--study", str(a.study), "--factor", str(a.factor),
                           "--write-schedule", str(sched_file)], capture_output=True, text=True)
    print(plan.stdout)
    if plan.returncode != 0:
        sys.exit(plan.stderr)
    schedule = load_batch_schedule(str(sched_file))
    first, last = schedule[0][1], schedule[-1][1]
    results = json.loads((a.study / "results.json").read_text())
    targets = [t["target"] for t in results.get("by_target", [])] or [results["target"]]
    base = study_cell_config(a.study)
    target = base["target"] = results.get("target", targets[-1])
    eval_every = max(base["eval_every_samples"] // max(1, base["batch_size"]) * first, first)
    print(f"schedule {sched_file.read_text().splitlines()[-1]}; arms: schedule, constant {first}, constant {last}; "
          f"target {target}; evaluation every {eval_every} samples")
    arms = {"schedule": dict(batch_size=first, batch_schedule=str(sched_file)),
            "first": dict(batch_size=first), "last": dict(batch_size=last)}
    rows: dict[str, list[dict]] = {k: [] for k in arms}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm, kw in arms.items():
            out = a.out / f"{arm}_s{seed}"
            cfg = TrainConfig.from_dict({**base, **kw, "seed": seed, "out": str(out), "overwrite": True,
                                         "eval_every_samples": eval_every, "device": a.device, "progress": "none"})
            s = train(cfg).summary
            rows[arm].append({"seed": seed, "samples": s["samples_to_target"], "steps": s["steps_to_target"],
                              "reached": s["reached_target"], "dir": out})
            print(f"seed {seed} {arm:8s}: reached {s['reached_target']}, samples {s['samples_to_target']}, "
                  f"steps {s['steps_to_target']}, final batch {s['batch_size']}", flush=True)

    def med(arm: str, key: str) -> float | None:
        vals = [r[key] for r in rows[arm] if r["reached"]]
        return statistics.median(vals) if len(vals) == len(rows[arm]) else None

    print("\n| arm | batch | reached | samples to target (median) | steps to target (median) |")
    print("|---|---|---|---|---|")
    for arm, label in (("schedule", sched_file.read_text().splitlines()[-1]), ("first", first), ("last", last)):
        n = sum(r["reached"] for r in rows[arm])
        print(f"| {arm} | {label} | {n}/{len(rows[arm])} | {med(arm, 'samples')} | {med(arm, 'steps')} |")
    s_sched, s_last = med("schedule", "samples"), med("last", "samples")
    t_sched, t_last = med("schedule", "steps"), med("last", "steps")
    if None not in (s_sched, s_last, t_sched, t_last):
        ds, dt = s_sched / s_last - 1, t_sched / t_last - 1
        ok = ds <= -0.20 and dt <= 0.10
        print(f"\nschedule vs constant {last}: samples {100 * ds:+.1f}%, steps {100 * dt:+.1f}% "
              f"(goal: samples <= -20%, steps <= +10%: {'met' if ok else 'not met'})")
    else:
        print("\nnot every run reached the target: no comparison")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        name = "accuracy" if isinstance(target, float) and target <= 1 else None
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        colors = {"schedule": "C0", "first": "C1", "last": "C2"}
        for arm in ("first", "last", "schedule"):  # the schedule last, on top: it follows "first" at the start
            runs = rows[arm]
            for i, r in enumerate(runs):
                summary = json.loads((r["dir"] / "summary.json").read_text())
                name = summary.get("metric_name", name) or "metric"
                curve = metric_curve(r["dir"], name)
                if not curve:
                    continue
                steps, samples, vals = zip(*curve)
                lab = arm if i == 0 else None
                lw = 1.8 if arm == "schedule" else 1.2
                axes[0].plot(samples, vals, color=colors[arm], alpha=0.8, lw=lw, label=lab)
                axes[1].plot(steps, vals, color=colors[arm], alpha=0.8, lw=lw, label=lab)
        for ax, x in zip(axes, ("samples", "optimizer steps")):
            ax.axhline(target, color="gray", ls=":", lw=1)
            ax.set_xlabel(x)
            ax.set_ylabel(name)
            ax.set_xscale("log")
            ax.legend()
        fig.suptitle(f"schedule vs constant batches ({len(rows['schedule'])} seeds)")
        fig.tight_layout()
        fig.savefig(a.out / "schedule_validation.png", dpi=110)
        print(f"plot: {a.out / 'schedule_validation.png'}")


if __name__ == "__main__":
    main()

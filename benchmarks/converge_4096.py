"""Issue 3's convergence check: LARS, LAMB and MERIT train the MNIST-1D CNN to >= 90% test
accuracy at batch 4096 with the LR moved there by a scaling rule from a base LR tuned at 128.

The practitioner's recipe: tune the base LR at batch 128 (a log-spaced grid, ``--grid``), keep
the best, then let the trainer move it to batch 4096 with the optimizer's rule. The final runs
use the same recipe in epochs at both batch sizes (constant LR after the warmup, 48 epochs).

    PYTHONPATH=. python benchmarks/converge_4096.py            # the chosen configs (a few minutes)
    PYTHONPATH=. python benchmarks/converge_4096.py --grid     # rerun the base-LR grid at 128 first
    PYTHONPATH=. python benchmarks/converge_4096.py --optimizers lars --seeds 0

Prints markdown tables and writes ``results.json`` under ``--out``. Accuracy is test accuracy,
evaluated every 4096 samples (every step at 4096, every 32 steps at 128); "steps to 0.9" is the
first evaluation at or above 0.9. MNIST-1D has no validation split: the grid is scored on the
test set too (best accuracy within the grid budget, averaged over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bigbatch.scaling import Recipe, default_rule, rescale
from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics

BASE, BIG = 128, 4096
TARGET = 0.9
EPOCHS = 48  # the final runs, both batch sizes (4096: 375 steps of the 32 000 training examples)
GRID_EPOCHS = 24  # the base-LR grid at 128 (6 000 steps)
EVAL_EVERY = 4096
DATASET = 32_000  # mnist1d's default training split (num_samples 40 000, 80 %)

GRID = {
    "lamb": [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032],
    "merit": [0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016],
    "lars": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
}


@dataclass(frozen=True)
class Choice:
    lr: float  # base LR at batch 128, the grid's winner
    rule: str  # scaling rule 128 -> 4096
    warmup_epochs: float = 0.0  # at batch 128; the rule moves it (legw: x k)


# Grid winners (2026-11-29, seeds 0 and 1). LARS: its default rule (linear, LR 64 at 4096) stays
# at chance accuracy, also with a 5-epoch warmup; LEGW (sqrt LR, warmup x k) is the recipe that works.
CHOSEN = {
    "lamb": Choice(lr=0.004, rule="sqrt"),
    "merit": Choice(lr=0.002, rule="sqrt"),
    "lars": Choice(lr=2.0, rule="legw", warmup_epochs=0.25),
}


def scaled(opt: str, c: Choice, batch: int) -> Recipe:
    """The recipe the trainer runs at ``batch`` (LR and warmup moved by the rule)."""
    base = Recipe(dataset_size=DATASET, batch_size=BASE, lr=c.lr, optimizer=opt,
                  warmup_epochs=c.warmup_epochs, budget_epochs=EPOCHS)
    return rescale(base, batch, c.rule).recipe


def run(opt: str, c: Choice, batch: int, epochs: float, seed: int, root: Path) -> dict[str, Any]:
    out = root / f"{opt}_lr{c.lr:g}_{c.rule}_w{c.warmup_epochs:g}_b{batch}_e{epochs:g}_s{seed}"
    cfg = TrainConfig(
        workload="mnist1d", optimizer=opt, lr=c.lr, base_batch_size=BASE, batch_size=batch, rule=c.rule,
        warmup_samples=round(c.warmup_epochs * DATASET), budget_epochs=epochs, eval_every_samples=EVAL_EVERY,
        checkpoint_every_samples=0, seed=seed, device="cpu", progress="none", out=str(out),
    )
    t0 = time.perf_counter()
    res = train(cfg)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    accs = [r["accuracy"] for r in evals]
    return {
        "optimizer": opt, "base_lr": c.lr, "rule": c.rule, "warmup_epochs_base": c.warmup_epochs,
        "batch_size": batch, "epochs": epochs, "seed": seed, "lr": res.summary["lr"],
        "best": max(accs), "final": accs[-1], "steps": res.summary["steps"],
        "steps_to_target": next((r["step"] for r in evals if r["accuracy"] >= TARGET), None),
        "diverged": res.summary["diverged"], "wall_s": time.perf_counter() - t0,
    }


def grid(opts: list[str], seeds: list[int], root: Path, rules: dict[str, str]) -> tuple[dict[str, float], list[dict]]:
    """Base-LR grid at 128; returns the winner per optimizer (mean best accuracy over seeds)."""
    rows, best = [], {}
    for opt in opts:
        scores = {}
        for lr in GRID[opt]:
            rs = [run(opt, Choice(lr, rules[opt]), BASE, GRID_EPOCHS, s, root) for s in seeds]
            rows += rs
            # A run that diverged (non-finite loss or gradient) disqualifies its LR.
            scores[lr] = -math.inf if any(r["diverged"] for r in rs) else statistics.mean(r["best"] for r in rs)
            print(f"  grid {opt} lr {lr:g}: " + ", ".join(_acc(r) for r in rs), file=sys.stderr, flush=True)
        best[opt] = max(scores, key=scores.get)
    return best, rows


def _acc(r: dict) -> str:
    return f"{r['best']:.3f}" + (" (diverged)" if r["diverged"] else "")


def _steps(r: dict) -> str:
    return "no" if r["steps_to_target"] is None else str(r["steps_to_target"])


def grid_table(rows: list[dict], best: dict[str, float]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    head = ["optimizer", "base LR @128"] + [f"best acc, seed {s}" for s in seeds] + [f"steps to 0.9, seed {s}" for s in seeds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["optimizer"], r["base_lr"]) for r in rows}, key=lambda k: (list(GRID).index(k[0]), k[1]))
    for opt, lr in keys:
        rs = {r["seed"]: r for r in rows if (r["optimizer"], r["base_lr"]) == (opt, lr)}
        mark = " **(chosen)**" if best.get(opt) == lr else ""
        cells = [opt.upper(), f"{lr:g}{mark}"] + [_acc(rs[s]) for s in seeds] + [_steps(rs[s]) for s in seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(rows: list[dict], chosen: dict[str, Choice]) -> str:
    head = ["optimizer", "tuned base LR @128", "rule", "LR @4096", "warmup @4096 (epochs)",
            "best acc @128", "steps to 0.9 @4096", "best acc @4096", "≥ 0.9 @4096?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for opt, c in chosen.items():
        small = sorted((r for r in rows if r["optimizer"] == opt and r["batch_size"] == BASE), key=lambda r: r["seed"])
        big = sorted((r for r in rows if r["optimizer"] == opt and r["batch_size"] == BIG), key=lambda r: r["seed"])
        rec = scaled(opt, c, BIG)
        ok = all(r["best"] >= TARGET and not r["diverged"] for r in big)
        cells = [
            opt.upper(), f"{c.lr:g}", c.rule, f"{rec.lr:.4g}", f"{rec.warmup_epochs:g}",
            " / ".join(_acc(r) for r in small), " / ".join(_steps(r) for r in big),
            " / ".join(_acc(r) for r in big), "yes" if ok else "**no**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", default="lamb,merit,lars")
    ap.add_argument("--seeds", default="0,1", help="comma-separated; values per seed are shown as a / b")
    ap.add_argument("--grid", action="store_true", help="rerun the base-LR grid at 128 and use its winners")
    ap.add_argument("--rule", action="append", default=[], metavar="OPT=RULE", help="override a rule, e.g. lars=legw")
    ap.add_argument("--warmup", action="append", default=[], metavar="OPT=EPOCHS",
                    help="warmup at batch 128 in epochs, e.g. lars=0.25 (the rule moves it to 4096)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the runs are small)")
    ap.add_argument("--out", default=None, help="directory for the runs and results.json (default: a temp dir)")
    a = ap.parse_args(argv)
    opts = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    for o in opts:
        if o not in GRID:
            ap.error(f"--optimizers: unknown optimizer {o!r} (known: {', '.join(GRID)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    chosen = {o: CHOSEN[o] for o in opts}
    for kind, items in (("rule", a.rule), ("warmup", a.warmup)):
        for item in items:
            o, _, v = item.partition("=")
            if o not in chosen:
                ap.error(f"--{kind} {item!r}: {o!r} is not among --optimizers")
            c = chosen[o]
            chosen[o] = Choice(c.lr, v, c.warmup_epochs) if kind == "rule" else Choice(c.lr, c.rule, float(v))
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="converge_4096_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"rules (default per optimizer: {', '.join(f'{o} {default_rule(o)}' for o in opts)}); runs under {root}",
          file=sys.stderr)

    grid_rows: list[dict] = []
    if a.grid:
        best, grid_rows = grid(opts, seeds, root, {o: c.rule for o, c in chosen.items()})
        chosen = {o: Choice(best[o], c.rule, c.warmup_epochs) for o, c in chosen.items()}
        print(f"\n## Base-LR grid at batch {BASE} ({GRID_EPOCHS} epochs, constant LR, no warmup)\n")
        print(grid_table(grid_rows, best))

    rows = []
    for opt, c in chosen.items():
        for s in seeds:
            for b in (BASE, BIG):
                r = run(opt, c, b, EPOCHS, s, root)
                rows.append(r)
                print(f"  {opt} batch {b} seed {s}: best {r['best']:.4f}, steps to 0.9 {_steps(r)}, "
                      f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"\n## Batch {BIG} with the rule-scaled LR ({EPOCHS} epochs at both sizes; seeds {' / '.join(map(str, seeds))})\n")
    print(final_table(rows, chosen))
    (root / "results.json").write_text(json.dumps(
        {"chosen": {o: asdict(c) for o, c in chosen.items()}, "grid": grid_rows, "final": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

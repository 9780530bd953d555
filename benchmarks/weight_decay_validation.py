"""Does keeping AdamW's weight-decay timescale fixed in samples keep a recipe's behaviour? (issue 31, item 5)

A recipe tuned at batch ``B`` (AdamW, LR η, weight decay λ) is moved to ``kB`` by the sqrt rule
(LR × √k; betas kept, so that only the weight decay differs between the arms), once with λ kept
and once with ``weight_decay_rule="timescale"`` (λ' = λ·k·η/η' = λ·√k: Wang & Aitchison 2024's
τ_iter = 1/(ηλ) steps held fixed in epochs, Bergsma et al. 2025's τ = B/(ηλD)). Arms:

* ``base``: batch ``B``, the recipe as tuned;
* ``keep@kB``: batch ``kB``, λ kept (the timescale in samples grows by √k);
* ``timescale@kB``: batch ``kB``, λ moved by the rule (the timescale in samples is the base's);
* ``base,tau-of-keep@kB``: batch ``B`` with λ/√k, the timescale in samples of ``keep@kB``: if the
  timescale in samples is what matters, ``keep@kB`` behaves like this arm and ``timescale@kB``
  like ``base``.

The rule can only show where the run is several timescales long and the batches stay in the
perfect-scaling regime, so the defaults are MNIST-1D's MLP (32 000 training examples) with
λ = 0.5 at η = 1e-3 and B = 32 (τ = 2 epochs) over 20 epochs (10 τ), scaled × 4 and × 8. Every
arm runs the whole budget; ``record_targets`` notes the first crossing of each target without
stopping. The table gives, per arm, the mean ± standard deviation over seeds of the final and best
test accuracy, and the median samples and steps to each target (``-`` where a seed never got
there). Runs on the CPU in a few minutes.

    python benchmarks/weight_decay_validation.py --seeds 0,1,2 --factors 4,8 --out runs/wdval
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bigbatch.scaling import Recipe, rescale, weight_decay_timescale
from bigbatch.train import TrainConfig, train
from bigbatch.workloads.mnist1d import MNIST1D


def arm_recipes(base: Recipe, factors: list[int]) -> dict[str, Recipe]:
    """The base recipe and, per factor, the sqrt-rule recipe with λ kept and with the timescale rule,
    and the base batch with the weight decay whose timescale in samples is that of ``keep@kB``."""
    arms = {"base": base}
    for k in factors:
        b = base.batch_size * k
        keep = arms[f"keep@{b}"] = rescale(base, b, "sqrt").recipe
        arms[f"timescale@{b}"] = rescale(base, b, "sqrt", weight_decay_rule="timescale").recipe
        # λ_eq with B/(η·λ_eq) = kB/(η'·λ): the base batch at keep@kB's timescale (λ/√k under sqrt)
        arms[f"base,tau-of-keep@{b}"] = base.replace(weight_decay=base.weight_decay * keep.lr / (k * base.lr))
    return arms


def run_arm(r: Recipe, seed: int, a: argparse.Namespace, out: Path) -> dict:
    cfg = TrainConfig(
        workload="mnist1d", workload_args={"model": a.model}, batch_size=r.batch_size, lr=r.lr, optimizer="adamw",
        weight_decay=r.weight_decay, optimizer_args={"betas": list(r.betas)}, schedule="constant", warmup_samples=0,
        budget_epochs=a.epochs, eval_every_samples=a.eval_every, checkpoint_every_samples=0,
        record_targets=list(a.targets), seed=seed, device=a.device, progress="none", out=str(out), overwrite=True,
    )
    s = train(cfg).summary
    cross = {c["target"]: c for c in s["crossings"]}
    return {"final": s["final_metric"], "best": s["best_metric"], "steps": s["steps"],
            "to": {t: (cross[t]["samples"], cross[t]["steps"]) if t in cross else None for t in a.targets}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--factors", default="4,8", help="batch multipliers k")
    ap.add_argument("--batch-size", type=int, default=32, help="the base batch B")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.5)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--targets", default="0.6,0.7", help="accuracies whose first crossing is recorded")
    ap.add_argument("--eval-every", type=int, default=4096, help="samples between evaluations (a multiple of every batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.targets = [float(t) for t in a.targets.split(",")]
    factors = [int(k) for k in a.factors.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    n_train = MNIST1D(model=a.model).dataset_size
    base = Recipe(batch_size=a.batch_size, lr=a.lr, optimizer="adamw", weight_decay=a.weight_decay, betas=(0.9, 0.999),
                  eps=1e-8, dataset_size=n_train, budget_epochs=a.epochs)
    arms = arm_recipes(base, factors)
    rows: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        for name, r in arms.items():
            res = run_arm(r, seed, a, a.out / f"{name.replace('@', '_').replace(',', '_')}_s{seed}")
            rows[name].append(res)
            print(f"seed {seed} {name:24s} batch {r.batch_size:5d} lr {r.lr:.4g} wd {r.weight_decay:.4g}: "
                  f"final {res['final']:.4f} best {res['best']:.4f} {res['to']}", flush=True)

    def ms(vals: list[float]) -> str:
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"

    def to(name: str, t: float, i: int) -> str:
        got = [x["to"][t] for x in rows[name]]
        if any(g is None for g in got):
            return f"- ({sum(g is not None for g in got)}/{len(got)} reached)"
        return f"{statistics.median(g[i] for g in got):,.0f}"

    head = " | ".join(f"samples to {t:g} | steps to {t:g}" for t in a.targets)
    print(f"\nMNIST-1D {a.model}, AdamW, betas (0.9, 0.999), constant LR, {a.epochs:g} epochs, seeds {a.seeds}")
    print(f"| arm | batch | lr | weight decay | timescale (epochs) | final acc | best acc | {head} |")
    print("|---|---|---|---|---|---|---|" + "---|---|" * len(a.targets))
    for name, r in arms.items():
        tau = weight_decay_timescale(r.lr, r.weight_decay, r.batch_size) / n_train
        cells = " | ".join(f"{to(name, t, 0)} | {to(name, t, 1)}" for t in a.targets)
        print(f"| {name} | {r.batch_size} | {r.lr:.4g} | {r.weight_decay:.4g} | {tau:.3g} | "
              f"{ms([x['final'] for x in rows[name]])} | {ms([x['best'] for x in rows[name]])} | {cells} |")
    (a.out / "results.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(a).items() if k != "out"}, "recipes": {n: r.to_dict() for n, r in arms.items()},
         "runs": {n: [{**x, "to": {str(t): v for t, v in x["to"].items()}} for x in rs] for n, rs in rows.items()}},
        indent=2, default=str))


if __name__ == "__main__":
    main()

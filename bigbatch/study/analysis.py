"""From finished cells to the study's results: best LR per batch size, the fit, B_crit, regimes.

Per batch size, the best LR multiplier is the one whose seeds *all* reached the target with the
fewest steps (median over seeds) — Shallue et al. 2018 (§3.3) compare batch sizes each at its
own best learning rate, since one fixed recipe conflates the batch size with a bad LR. The
fit then uses every seed's measurement at that LR (fit.py).

A best multiplier at the edge of those tried means the steps to target at that batch size are
overestimated (the optimum lies outside) and B_crit is biased; ``lr_extensions`` names the
next multiplier to try there (×2 above the largest, ÷2 below the smallest), and the study runs
it until the best is interior or ``lr_extend`` multipliers were added at that batch size.
"""

from __future__ import annotations

import statistics
from typing import Any

from bigbatch.study.fit import (
    CriticalBatchFit,
    bootstrap_critical_batch,
    fit_critical_batch,
    regime,
    regime_bounds,
    steps_model,
    undetermined_reason,
)

__all__ = ["analyze", "best_per_batch", "lr_extensions", "fit_rows", "analyze_targets", "RESOLUTION_GOAL"]

#: A crossing is known to within the gap since the evaluation before it; a note says where that
#: is coarser than this fraction of the samples-to-target (and more than one step).
RESOLUTION_GOAL = 0.02


def best_per_batch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per batch size: the best LR multiplier and its per-seed steps/samples to target."""
    by_b: dict[int, dict[float, list[dict[str, Any]]]] = {}
    for r in records:
        by_b.setdefault(int(r["batch_size"]), {}).setdefault(float(r["lr_multiplier"]), []).append(r)
    rows = []
    for b in sorted(by_b):
        best = None
        for mult, rs in sorted(by_b[b].items()):
            if not all(r.get("reached_target") for r in rs):
                continue
            med = statistics.median(r["steps_to_target"] for r in rs)
            if best is None or med < best[0]:
                best = (med, mult, rs)
        row: dict[str, Any] = {"batch_size": b, "lr_multipliers_tried": sorted(by_b[b])}
        if best is None:
            row.update(reached=False, best_lr_multiplier=None, best_lr=None, steps=None, samples=None,
                       steps_per_seed=[], samples_per_seed=[], resolution_per_seed=[], resolution_steps_per_seed=[],
                       seeds=[])
        else:
            med, mult, rs = best
            rs = sorted(rs, key=lambda r: r["seed"])
            row.update(
                reached=True,
                best_lr_multiplier=mult,
                best_lr=rs[0].get("lr"),  # the peak LR the trainer used at this batch size
                steps=med,
                samples=statistics.median(r["samples_to_target"] for r in rs),
                steps_per_seed=[r["steps_to_target"] for r in rs],
                samples_per_seed=[r["samples_to_target"] for r in rs],
                resolution_per_seed=[_resolution(r) for r in rs],
                resolution_steps_per_seed=[r.get("resolution_steps") for r in rs],
                seeds=[r["seed"] for r in rs],
                best_at_grid_edge=len(by_b[b]) > 1 and mult in (min(by_b[b]), max(by_b[b])),
            )
        rows.append(row)
    return rows


def _outside(multipliers: list[float], lr_grid: list[float]) -> list[float]:
    """The multipliers that are grid extensions (not in ``lr_grid``)."""
    grid = {float(m) for m in lr_grid}
    return [m for m in multipliers if float(m) not in grid]


def lr_extensions(records: list[dict[str, Any]], lr_grid: list[float], lr_extend: int) -> list[tuple[int, float]]:
    """``(batch size, multiplier)`` to run next: one per batch size whose best is at an edge.

    The edge is that of the multipliers tried at the batch size (grid plus earlier extensions);
    a batch size stops once ``lr_extend`` multipliers outside ``lr_grid`` were tried there. A
    larger multiplier that did not reach the target (diverged, or too unstable to reach it in
    the budget) leaves the previous best interior, which ends the search there.
    """
    out = []
    for row in best_per_batch(records):
        if not row.get("best_at_grid_edge"):
            continue
        tried = row["lr_multipliers_tried"]
        if len(_outside(tried, lr_grid)) >= lr_extend:
            continue
        mult = row["best_lr_multiplier"]
        out.append((row["batch_size"], mult * 2.0 if mult == max(tried) else mult / 2.0))
    return out


def fit_rows(rows: list[dict[str, Any]], cfg: Any, *, bootstrap_seed: int = 0) -> tuple[dict[str, Any], CriticalBatchFit | None]:
    """The McCandlish fit to the best-LR rows, with its bootstrap interval, as results keys.

    Returns the keys (``b_crit``, ``b_crit_interval``, ``b_crit_undetermined``, ``s_min``,
    ``e_min``, ``b_noise``, ``fit_rmse_log``, ``fit_points``) and the fit itself. Where the
    measurements do not determine B_crit (fit.undetermined_reason) every fitted number is
    ``None``, the fit returned is ``None`` and ``b_crit_undetermined`` says why.
    """
    xs = [row["batch_size"] for row in rows if row["reached"] for _ in row["steps_per_seed"]]
    ys = [s for row in rows if row["reached"] for s in row["steps_per_seed"]]
    fit = interval = None
    if len(set(xs)) >= 3:
        fit = fit_critical_batch(xs, ys)
        interval = bootstrap_critical_batch(xs, ys, resamples=cfg.bootstrap, confidence=cfg.confidence, seed=bootstrap_seed)
    reason = undetermined_reason(xs, fit, interval)
    if reason is not None:
        fit = interval = None
    return {
        "b_crit": fit.b_crit if fit else None,
        "b_crit_interval": list(interval) if interval else None,
        "b_crit_undetermined": reason,
        "s_min": fit.s_min if fit else None,
        "e_min": fit.e_min if fit else None,
        "b_noise": fit.b_noise if fit else None,
        "fit_rmse_log": fit.rmse_log if fit else None,
        "fit_points": len(xs),
    }, fit


def _resolution(record: dict[str, Any]) -> float | None:
    """The gap before the crossing as a fraction of the samples to target (the crossing lies in it).

    The trainer's own (``resolution``: to the evaluation before it, dense or not); for a record
    without it (written before it existed), the evaluation interval.
    """
    if not record.get("reached_target"):
        return None
    if record.get("resolution") is not None:
        return float(record["resolution"])
    every = (record.get("train") or {}).get("eval_every_samples")
    samples = record.get("samples_to_target")
    if not every or not samples:
        return None
    return float(every) / float(samples)


_ENTRY_KEYS = ("reached_target", "steps_to_target", "samples_to_target", "b_simple_at_target", "resolution", "resolution_steps")


def _at_target(record: dict[str, Any], target: float) -> dict[str, Any]:
    """``record`` as if ``target`` were its only target (its ``by_target`` entry for it)."""
    entry = next((e for e in record.get("by_target") or [] if e["target"] == target), None)
    if entry is None:  # no crossing information: not counted as reached
        entry = {"reached_target": False}
    return {**record, **{k: entry.get(k) for k in _ENTRY_KEYS}}


def _coarse(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """``(batch size, resolution)`` of every fitted crossing known less precisely than the goal
    (one step is as precise as a crossing can be known, whatever fraction it is)."""
    out = []
    for row in rows:
        if not row["reached"]:
            continue
        steps = row.get("resolution_steps_per_seed") or [None] * len(row["resolution_per_seed"])
        out += [(row["batch_size"], x) for x, k in zip(row["resolution_per_seed"], steps)
                if x is not None and x > RESOLUTION_GOAL and k != 1]
    return out


def _b_simple_at_target(records: list[dict[str, Any]]) -> list[float]:
    return [r["b_simple_at_target"] for r in records
            if r.get("reached_target") and r.get("b_simple_at_target") is not None and not r.get("diverged")]


def analyze_targets(records: list[dict[str, Any]], targets: list[float], cfg: Any, *, bootstrap_seed: int = 0) -> list[dict[str, Any]]:
    """``by_target``: per target, the best LR per batch size, the fit, B_crit and B_simple at that target.

    Each cell carries, in ``by_target``, when its run first reached each target; the best LR
    multiplier is chosen per target (the LR fastest to an easy target need not be the fastest
    to a hard one).
    """
    out = []
    for t in targets:
        view = [_at_target(r, t) for r in records]
        rows = best_per_batch(view)
        curve, _ = fit_rows(rows, cfg, bootstrap_seed=bootstrap_seed)
        simple = _b_simple_at_target(view)
        res = [x for row in rows if row["reached"] for x in row.get("resolution_per_seed", [])]
        out.append({
            "target": t,
            **curve,
            "b_simple": statistics.median(simple) if simple else None,
            "b_simple_cells": len(simple),
            "cells_reached": sum(1 for r in view if r.get("reached_target")),
            "resolution_max": max(res) if res else None,
            "batch_sizes": [{k: row.get(k) for k in ("batch_size", "reached", "best_lr_multiplier", "best_lr", "steps", "samples",
                                                     "steps_per_seed", "samples_per_seed", "resolution_per_seed",
                                                     "resolution_steps_per_seed")} for row in rows],
        })
    return out


def analyze(
    records: list[dict[str, Any]],
    cfg: Any,
    resolved: dict[str, Any],
    *,
    total_cells: int,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """The content of ``results.json`` for the finished ``records``."""
    rows = best_per_batch(records)
    lr_extend = getattr(cfg, "lr_extend", 0)
    for row in rows:
        row["lr_extensions"] = _outside(row["lr_multipliers_tried"], cfg.lr_grid)
    records = [{**r, "lr_extension": bool(_outside([r["lr_multiplier"]], cfg.lr_grid)),
                "resolution": _resolution(r)} for r in records]
    notes: list[str] = []
    curve, fit = fit_rows(rows, cfg, bootstrap_seed=bootstrap_seed)
    if curve["b_crit_undetermined"]:
        notes.append(f"B_crit undetermined: {curve['b_crit_undetermined']}")
    for row in rows:
        row["regime"] = regime(row["batch_size"], fit.b_noise) if fit else None
        row["steps_fit"] = float(steps_model(row["batch_size"], fit.s_min, fit.b_noise)) if fit else None
        if row.get("best_at_grid_edge"):
            n_ext = len(row["lr_extensions"])
            if lr_extend > 0 and n_ext >= lr_extend:
                notes.append(
                    f"at B={row['batch_size']} the best LR is still at the edge after {n_ext} extension(s) of "
                    f"--lr-grid (the --lr-extend {lr_extend} limit): the true best LR may lie outside "
                    f"x{min(row['lr_multipliers_tried']):g}..x{max(row['lr_multipliers_tried']):g}"
                )
            else:
                notes.append(
                    f"at B={row['batch_size']} the best LR is at the edge of --lr-grid: the true best LR may lie outside it"
                )
    not_reached = [row["batch_size"] for row in rows if not row["reached"]]
    if not_reached:
        notes.append(f"not reached within the budget at B = {', '.join(map(str, not_reached))}")

    # B_simple grows as the loss falls (McCandlish et al. 2018, §3.2 and Fig. 6), and B_crit for a
    # target is compared with the noise scale measured at that target's loss: so the reading when
    # each run reached the target is used, and the median over a whole run where none is there.
    at_target = _b_simple_at_target(records)
    whole_run = [r["b_simple_median"] for r in records if r.get("b_simple_median") is not None and not r.get("diverged")]
    b_simple_values = at_target or whole_run
    b_simple = statistics.median(b_simple_values) if b_simple_values else None
    b_simple_source = "at target" if at_target else ("run median" if whole_run else None)
    if b_simple is None:
        notes.append("B_simple not available: the trainer's summary.json carries no b_simple_median (noise monitor off or not integrated)")

    targets = resolved.get("targets")
    by_target = analyze_targets(records, targets, cfg, bootstrap_seed=bootstrap_seed) if targets else None
    coarse = _coarse(rows)
    for entry in by_target or []:
        coarse += _coarse(entry["batch_sizes"])
    if coarse:
        worst = max(coarse, key=lambda bx: bx[1])
        notes.append(
            f"samples to target are known only to within one evaluation interval: up to {worst[1]:.0%} of them "
            f"(at B={worst[0]}), coarser than {RESOLUTION_GOAL:.0%}; set --target-resolution 0.02 (dense evaluation "
            f"around each crossing) or lower --eval-every-samples / --eval-every-steps"
        )
    lo_b, hi_b = regime_bounds(fit.b_noise) if fit else (None, None)
    results = {
        "workload": resolved["workload_name"],
        "metric_name": resolved["metric_name"],
        "higher_is_better": resolved["higher_is_better"],
        "target": resolved["target"],
        "b_crit": curve["b_crit"],
        "b_crit_interval": curve["b_crit_interval"],
        "b_crit_undetermined": curve["b_crit_undetermined"],
        "confidence": cfg.confidence,
        "b_simple": b_simple,
        "b_simple_cells": len(b_simple_values),
        "b_simple_source": b_simple_source,
        "b_simple_run_median": statistics.median(whole_run) if whole_run else None,
        "s_min": curve["s_min"],
        "e_min": curve["e_min"],
        "b_noise": curve["b_noise"],
        "fit_rmse_log": curve["fit_rmse_log"],
        "fit_points": curve["fit_points"],
        "regime_bounds": {"perfect_scaling_up_to": lo_b, "maximal_data_parallelism_from": hi_b},
        "batch_sizes": rows,
        "cells": records,
        "cells_done": len(records),
        "cells_total": total_cells,
        "notes": notes,
        "resolved": resolved,
        "config": cfg.to_dict(),
    }
    if by_target is not None:  # the single-target keys above describe the hardest target
        results["targets"] = list(targets)
        results["by_target"] = by_target
    return results

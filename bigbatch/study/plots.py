"""The study's four plots (matplotlib, Agg backend): steps, samples, S–E front, best LR vs B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bigbatch.study.fit import regime_bounds, samples_model, steps_model

__all__ = ["make_plots", "PLOTS", "PLOTS_BY_TARGET"]

#: File name → title, in the order the report shows them.
PLOTS = {
    "steps.png": "Steps to target vs batch size",
    "samples.png": "Samples to target vs batch size",
    "pareto.png": "Steps–samples trade-off (Pareto front)",
    "best_lr.png": "Best learning rate vs batch size",
}

#: The plots of a study with several targets (``--targets``), after those above.
PLOTS_BY_TARGET = {
    "b_crit_by_target.png": "B_crit and B_simple at each target",
    "steps_by_target.png": "Steps to each target vs batch size",
}

_REGIME_COLORS = ("#e6f4ea", "#fff4e0", "#fde8e8")  # perfect scaling, diminishing, maximal
_FIT = "#1f4e9c"
_POINT = "#d1495b"
_SIMPLE = "#2a9d8f"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Save atomically (temporary file, then rename), so an interrupted study never leaves half a PNG."""
    import os

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when interrupted mid-write
        _plt().close(fig)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _readable_log_y(ax: Any) -> None:
    """Label 1-2-5 ticks with plain numbers: a curve spanning one decade otherwise gets one label."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _log2_axis(ax: Any, bs: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs)
    ax.set_xticklabels([str(b) for b in bs])
    ax.minorticks_off()


def _b_markers(ax: Any, res: dict[str, Any], xmin: float, xmax: float, label_regimes: bool) -> None:
    """Regime bands, B_crit with its interval, and B_simple, as vertical features."""
    b = res.get("b_noise")
    if b:
        lo, hi = regime_bounds(b)
        edges = [xmin, max(xmin, min(lo, xmax)), max(xmin, min(hi, xmax)), xmax]
        names = ("perfect scaling", "diminishing returns", "maximal data parallelism")
        for i, ((a, z), color, name) in enumerate(zip(zip(edges[:-1], edges[1:]), _REGIME_COLORS, names)):
            if z > a:
                ax.axvspan(a, z, color=color, zorder=0, lw=0)
                if label_regimes:
                    # Outer bands are labelled from the plot's edge inwards so the text is never cut off.
                    x, ha = {0: (a * 1.04, "left"), 2: (z / 1.04, "right")}.get(i, (np.sqrt(a * z), "center"))
                    # The middle label sits one line lower: a narrow outer band's label may reach into it.
                    y = 0.92 if i == 1 else 0.98
                    ax.text(x, y, name, transform=ax.get_xaxis_transform(), ha=ha, va="top", fontsize=8, color="#555555")
        ax.axvline(res["b_crit"], color=_FIT, ls="--", lw=1.2, label=f"B_crit = {res['b_crit']:.0f} (fit)")
        iv = res.get("b_crit_interval")
        if iv and min(iv[1], xmax) > max(iv[0], xmin):  # an extrapolated interval may lie off the plot
            ax.axvspan(max(iv[0], xmin), min(iv[1], xmax), color=_FIT, alpha=0.08, zorder=0,
                       label=f"{res['confidence']:.0%} interval [{iv[0]:.0f}, {iv[1]:.0f}]")
    if res.get("b_simple"):
        ax.axvline(res["b_simple"], color=_SIMPLE, ls="-.", lw=1.5, label=f"B_simple = {res['b_simple']:.0f} (measured, {res.get('b_simple_source') or 'run median'})")
    ax.set_xlim(xmin, xmax)


def _measured(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    px, py, mx, my = [], [], [], []
    for row in rows:
        if row["reached"]:
            for v in row[f"{key}_per_seed"]:
                px.append(row["batch_size"])
                py.append(v)
            mx.append(row["batch_size"])
            my.append(row[key])
    return px, py, mx, my


def _curve_plot(res: dict[str, Any], key: str, path: Path) -> None:
    plt = _plt()
    rows = res["batch_sizes"]
    bs = [r["batch_size"] for r in rows]
    xmin, xmax = min(bs) / 1.5, max(bs) * 1.5
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    _b_markers(ax, res, xmin, xmax, label_regimes=True)
    px, py, mx, my = _measured(rows, key)
    grid = np.geomspace(xmin, xmax, 200)
    if res.get("b_noise"):
        if key == "steps":
            fit = steps_model(grid, res["s_min"], res["b_noise"])
            label = f"fit S(B) = S_min(1 + B_noise/B), S_min = {res['s_min']:.0f}"
            ax.axhline(res["s_min"], color=_FIT, lw=0.8, ls=":")
        else:
            fit = samples_model(grid, res["e_min"], res["b_noise"])
            label = f"fit E(B) = E_min(1 + B/B_noise), E_min = {res['e_min']:.3g}"
            ax.axhline(res["e_min"], color=_FIT, lw=0.8, ls=":")
        ax.plot(grid, fit, color=_FIT, lw=2, label=label)
    if mx:
        # Ideal linear scaling from the smallest measured batch: steps ∝ 1/B, samples constant.
        b0, y0 = mx[0], my[0]
        ideal = y0 * b0 / grid if key == "steps" else np.full_like(grid, y0)
        ax.plot(grid, ideal, color="#888888", lw=1, ls="--", label="perfect scaling from the smallest B")
    ax.scatter(px, py, s=18, color=_POINT, alpha=0.45, zorder=3, label="each seed (best LR)" if len(px) > len(mx) else None)
    ax.plot(mx, my, "o", color=_POINT, ms=7, mec="white", zorder=4, label=f"measured {key} to target (best LR)")
    miss = [r["batch_size"] for r in rows if not r["reached"]]
    if miss:
        top = max(py) * 1.3 if py else 1.0
        ax.plot(miss, [top] * len(miss), "^", color="#444444", ms=8, zorder=4, label="not reached within budget")
    if not py:
        ax.set_ylim(0.5, 2.0)
        ax.text(0.5, 0.5, "no batch size reached the target", transform=ax.transAxes, ha="center", fontsize=12)
    elif res.get("b_crit_undetermined"):
        # No curve is drawn where the fit is not determined; say so on the plot itself.
        ax.text(0.98, 0.02, "B_crit undetermined: " + _wrap(res["b_crit_undetermined"], 60), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7.5, color="#8a4b00",
                bbox=dict(boxstyle="round", fc="white", ec="#e0c080", alpha=0.9))
    ax.set_yscale("log")
    _readable_log_y(ax)
    _log2_axis(ax, bs)
    ax.set_xlim(xmin, xmax)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("optimizer steps to target" if key == "steps" else "training examples to target")
    tgt = f"{res['metric_name']} {'≥' if res['higher_is_better'] else '≤'} {res['target']:g}"
    ax.set_title(f"{res['workload']}: {key} to reach {tgt}")
    # Steps fall from the upper left, samples rise to the upper right: the legend goes where they are not.
    if key == "steps":
        ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    else:  # upper left, below the regime label
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93), framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    _save(fig, path)


def _pareto_plot(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [r for r in res["batch_sizes"] if r["reached"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    if res.get("b_noise"):
        # (S/S_min − 1)(E/E_min − 1) = 1 (McCandlish et al. 2018, eq. 2.11), traced by B.
        grid = np.geomspace(res["b_noise"] / 300, res["b_noise"] * 300, 400)
        ax.plot(samples_model(grid, res["e_min"], res["b_noise"]), steps_model(grid, res["s_min"], res["b_noise"]),
                color=_FIT, lw=2, label="fit: (S/S_min − 1)(E/E_min − 1) = 1")
        ax.axhline(res["s_min"], color=_FIT, lw=0.8, ls=":", label=f"S_min = {res['s_min']:.0f}")
        ax.axvline(res["e_min"], color=_FIT, lw=0.8, ls="--", label=f"E_min = {res['e_min']:.3g}")
        bc = res["b_crit"]
        ax.plot([2 * res["e_min"]], [2 * res["s_min"]], "s", color=_FIT, ms=8, label=f"B = B_crit ({bc:.0f}): 2·S_min, 2·E_min")
    if not rows:
        ax.text(0.5, 0.5, "no batch size reached the target", transform=ax.transAxes, ha="center", fontsize=12)
        ax.set_axis_off()
        _save(fig, path)
        return
    e = [r["samples"] for r in rows]
    s = [r["steps"] for r in rows]
    ax.plot(e, s, "o", color=_POINT, ms=7, mec="white", zorder=4, label="measured (best LR per B)")
    for r in rows:
        ax.annotate(f"B={r['batch_size']}", (r["samples"], r["steps"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if e:
        ax.set_xlim(min(e) / 1.6, max(e) * 1.6)
        ax.set_ylim(min(s) / 1.6, max(s) * 1.6)
    ax.set_xlabel("training examples to target (E)")
    ax.set_ylabel("optimizer steps to target (S)")
    ax.set_title(f"{res['workload']}: steps vs examples (each point a batch size)")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    _save(fig, path)


def _lr_plot(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = res["batch_sizes"]
    bs = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    xmin, xmax = min(bs) / 1.5, max(bs) * 1.5
    _b_markers(ax, res, xmin, xmax, label_regimes=False)
    ok_x, ok_y, bad_x, bad_y = [], [], [], []
    for c in res["cells"]:
        (ok_x if c.get("reached_target") else bad_x).append(c["batch_size"])
        (ok_y if c.get("reached_target") else bad_y).append(c["lr"])
    ax.scatter(ok_x, ok_y, s=22, facecolors="none", edgecolors="#777777", label="tried: reached target")
    ax.scatter(bad_x, bad_y, s=22, marker="x", color="#aaaaaa", label="tried: not reached")
    best = [(r["batch_size"], r["best_lr"]) for r in rows if r["reached"] and r["best_lr"]]
    if best:
        ax.plot(*zip(*best), "o-", color=_POINT, ms=7, mec="white", lw=1.5, label="best LR (fewest steps)")
    rule = res["resolved"]["rule"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _log2_axis(ax, bs)
    ax.set_xlim(xmin, xmax)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("peak learning rate")
    ax.set_title(f"{res['workload']}: best LR per batch size (grid around the {rule} rule)")
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    _save(fig, path)


def _targets_axis(ax: Any, res: dict[str, Any]) -> None:
    ax.set_xlabel(f"target {res['metric_name']} ({'higher' if res['higher_is_better'] else 'lower'} is harder →)")
    if not res["higher_is_better"]:
        ax.invert_xaxis()  # left to right: easy to hard, as training proceeds


def _b_crit_by_target_plot(res: dict[str, Any], path: Path) -> None:
    """B_crit (with its interval) and B_simple against the target: how both grow as training proceeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    entries = res["by_target"]
    fitted = [e for e in entries if e["b_crit"] is not None]
    if fitted:
        t = [e["target"] for e in fitted]
        bc = np.array([e["b_crit"] for e in fitted])
        lo = np.array([e["b_crit_interval"][0] if e["b_crit_interval"] else e["b_crit"] for e in fitted])
        hi = np.array([e["b_crit_interval"][1] if e["b_crit_interval"] else e["b_crit"] for e in fitted])
        ax.errorbar(t, bc, yerr=[bc - lo, hi - bc], fmt="o-", color=_FIT, capsize=4, lw=1.5,
                    label=f"B_crit (fit, {res['confidence']:.0%} interval)")
    simple = [(e["target"], e["b_simple"]) for e in entries if e.get("b_simple")]
    if simple:
        ax.plot(*zip(*simple), "s-.", color=_SIMPLE, lw=1.5, label="B_simple when the target was reached")
    undetermined = [e["target"] for e in entries if e["b_crit"] is None]
    if undetermined:
        ax.plot(undetermined, [0.06] * len(undetermined), "x", color="#8a4b00", ms=9,
                transform=ax.get_xaxis_transform(), label="B_crit undetermined (see notes)")
    ax.set_yscale("log")
    _readable_log_y(ax)
    _targets_axis(ax, res)
    ax.set_ylabel("batch size")
    ax.set_title(f"{res['workload']}: critical batch size as the target gets harder")
    if fitted or simple or undetermined:
        ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    _save(fig, path)


def _steps_by_target_plot(res: dict[str, Any], path: Path) -> None:
    """S(B) of every target on one axis, each with its fit where determined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    bs = [r["batch_size"] for r in res["batch_sizes"]]
    xmin, xmax = min(bs) / 1.5, max(bs) * 1.5
    grid = np.geomspace(xmin, xmax, 200)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(res["by_target"])))
    any_point = False
    for e, color in zip(res["by_target"], colors):
        pts = [(row["batch_size"], row["steps"]) for row in e["batch_sizes"] if row["reached"]]
        fit_txt = f"B_crit {e['b_crit']:.0f}" if e["b_crit"] is not None else "B_crit undetermined"
        if pts:
            any_point = True
            ax.plot(*zip(*pts), "o", color=color, ms=6, mec="white", label=f"target {e['target']:g} ({fit_txt})")
        if e["b_noise"] is not None:
            ax.plot(grid, steps_model(grid, e["s_min"], e["b_noise"]), color=color, lw=1.5)
    if not any_point:
        ax.text(0.5, 0.5, "no batch size reached any target", transform=ax.transAxes, ha="center", fontsize=12)
        ax.set_ylim(0.5, 2.0)
    ax.set_yscale("log")
    _readable_log_y(ax)
    _log2_axis(ax, bs)
    ax.set_xlim(xmin, xmax)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("optimizer steps to target (best LR per target)")
    ax.set_title(f"{res['workload']}: steps to each {res['metric_name']} target")
    if any_point:
        ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    _save(fig, path)


def make_plots(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write the PNGs into ``out``; returns file name → path (empty when no cell has finished)."""
    out = Path(out)
    if not results["batch_sizes"]:
        return {}
    paths = {name: out / name for name in PLOTS}
    _curve_plot(results, "steps", paths["steps.png"])
    _curve_plot(results, "samples", paths["samples.png"])
    _pareto_plot(results, paths["pareto.png"])
    _lr_plot(results, paths["best_lr.png"])
    if results.get("by_target"):
        paths.update({name: out / name for name in PLOTS_BY_TARGET})
        _b_crit_by_target_plot(results, paths["b_crit_by_target.png"])
        _steps_by_target_plot(results, paths["steps_by_target.png"])
    return paths

"""``results.json`` and a self-contained ``report.html`` (PNG plots embedded as base64)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from bigbatch.study.plots import PLOTS, PLOTS_BY_TARGET, make_plots

__all__ = ["write_outputs", "render_html"]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e7:
            return str(int(v))
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _headline(res: dict[str, Any]) -> str:
    if res.get("b_crit") is None:
        why = res.get("b_crit_undetermined") or "not fitted (see notes)"
        bs = res.get("b_simple")
        simple = f" The noise monitor measured B_simple = {bs:.0f} ({res.get('b_simple_source') or 'run median'})." if bs else ""
        return (f"<p class='big'>Critical batch size: <b>undetermined</b></p>"
                f"<p>The measurements do not determine B_crit, so no number is given: {html.escape(why)}.{simple}</p>")
    iv = res.get("b_crit_interval")
    ivs = f" ({res['confidence']:.0%} bootstrap interval {iv[0]:.0f}–{iv[1]:.0f})" if iv else ""
    bs = res.get("b_simple")
    if bs is None:
        simple = "B_simple was not measured during the runs (the trainer reported no noise-scale readings)."
    else:
        ratio = res["b_crit"] / bs
        simple = f"The noise monitor measured B_simple = {bs:.0f} (median over {res['b_simple_cells']} runs, {res.get('b_simple_source') or 'run median'}; the whole-run median is {_fmt(res.get('b_simple_run_median'))}); B_crit / B_simple = {ratio:.2f}."
    lo, hi = res["regime_bounds"]["perfect_scaling_up_to"], res["regime_bounds"]["maximal_data_parallelism_from"]
    return (
        f"<p class='big'>Critical batch size <b>B_crit = {res['b_crit']:.0f}</b>{ivs}</p>"
        f"<p>Fit of steps to target S(B) = S_min(1 + B_noise/B) (McCandlish et al. 2018, eq. 2.11): "
        f"S_min = {res['s_min']:.0f} steps, E_min = {res['e_min']:.4g} examples, B_crit = E_min/S_min; "
        f"log-scale residual {res['fit_rmse_log']:.3f} over {res['fit_points']} runs. {simple}</p>"
        f"<p>Regimes (Shallue et al. 2018), from the fitted curve's slope: perfect scaling up to B ≈ {lo:.0f}, "
        f"diminishing returns up to B ≈ {hi:.0f}, maximal data parallelism beyond. Doubling the batch below "
        f"B_crit nearly halves the steps; above it mostly wastes examples.</p>"
    )


def _by_target_table(res: dict[str, Any]) -> str:
    """One row per target: B_crit with its interval (or why it is undetermined) and B_simple."""
    direction = "≥" if res["higher_is_better"] else "≤"
    rows = ["<h2>By target</h2><p>Each cell ran to the hardest target and recorded when it first reached "
            "each; the best LR is chosen per target. The sections below describe the hardest target.</p>"
            "<table><tr><th>target</th><th>B_crit</th><th>interval</th><th>S_min</th><th>E_min</th>"
            "<th>B_simple at target</th><th>cells reached</th></tr>"]
    for e in res["by_target"]:
        if e["b_crit"] is None:
            bc = f"<span class='note'>undetermined: {html.escape(e['b_crit_undetermined'] or '')}</span>"
            iv = "—"
        else:
            bc = f"{e['b_crit']:.0f}"
            iv = f"{e['b_crit_interval'][0]:.0f}–{e['b_crit_interval'][1]:.0f}" if e["b_crit_interval"] else "—"
        rows.append(f"<tr><td>{html.escape(res['metric_name'])} {direction} {e['target']:g}</td><td>{bc}</td><td>{iv}</td>"
                    f"<td>{_fmt(e['s_min'])}</td><td>{_fmt(e['e_min'])}</td><td>{_fmt(e['b_simple'])}</td>"
                    f"<td>{e['cells_reached']}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def render_html(res: dict[str, Any], pngs: dict[str, Path]) -> str:
    """The report page as one HTML string (no external resources)."""
    r = res["resolved"]
    title = f"bigbatch study: {res['workload']}"
    direction = "≥" if res["higher_is_better"] else "≤"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}.big{font-size:20px}img{max-width:100%;border:1px solid #eee;margin:6px 0}"
        ".note{color:#8a4b00}code{background:#f5f5f5;padding:1px 4px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Target: {html.escape(res['metric_name'])} {direction} {res['target']:g}. "
        f"{res['cells_done']} of {res['cells_total']} cells finished"
        f"{'' if res.get('complete') else ' — <b>incomplete study</b> (re-run the same command to continue)'}.</p>",
        _headline(res),
    ]
    if res["notes"]:
        parts.append("<ul>" + "".join(f"<li class='note'>{html.escape(n)}</li>" for n in res["notes"]) + "</ul>")
    if res.get("by_target"):
        parts.append(_by_target_table(res))
    for name, caption in {**PLOTS_BY_TARGET, **PLOTS}.items():
        if name in pngs and pngs[name].exists():
            data = base64.b64encode(pngs[name].read_bytes()).decode("ascii")
            parts.append(f"<h2>{caption}</h2><img alt='{caption}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Results per batch size</h2><table><tr><th>B</th><th>regime</th><th>best LR ×</th><th>best LR</th>"
                 "<th>steps to target</th><th>fit</th><th>samples to target</th><th>seeds</th>"
                 "<th>LR × tried (<b>bold</b>: grid extension)</th></tr>")
    for row in res["batch_sizes"]:
        ext = set(row.get("lr_extensions") or [])
        tried = ", ".join(f"<b>{m:g}</b>" if m in ext else f"{m:g}" for m in row.get("lr_multipliers_tried") or [])
        steps = _fmt(row["steps"]) if row["reached"] else "not reached"
        fitted = "—" if row["steps_fit"] is None else f"{row['steps_fit']:.0f}"
        parts.append(
            f"<tr><td>{row['batch_size']}</td><td>{_fmt(row['regime'])}</td><td>{_fmt(row['best_lr_multiplier'])}</td>"
            f"<td>{_fmt(row['best_lr'])}</td><td>{steps}</td><td>{fitted}</td>"
            f"<td>{_fmt(row['samples'])}</td><td>{len(row['seeds'])}</td><td>{tried}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>All cells</h2><details><summary>one row per run</summary><table><tr><th>cell</th><th>LR</th>"
                 f"<th>reached</th><th>steps</th><th>samples</th><th>final {html.escape(res['metric_name'])}</th>"
                 "<th>stopped</th><th>B_simple</th><th>wall s</th></tr>")
    for c in res["cells"]:
        parts.append(
            f"<tr><td>{html.escape(c['name'])}</td><td>{_fmt(c.get('lr'))}</td><td>{'yes' if c.get('reached_target') else 'no'}</td>"
            f"<td>{_fmt(c.get('steps_to_target'))}</td><td>{_fmt(c.get('samples_to_target'))}</td>"
            f"<td>{_fmt(c.get('final_metric'))}</td><td>{_fmt(c.get('stopped'))}</td>"
            f"<td>{_fmt(c.get('b_simple_median'))}</td><td>{_fmt(c.get('wall_seconds'), 3)}</td></tr>"
        )
    parts.append("</table></details>")
    settings = {
        "workload": res["config"]["workload"], "workload_args": res["config"]["workload_args"],
        "rule": r["rule"], "lr at base batch": r["lr"], "base batch size": r["base_batch_size"],
        "lr grid": res["config"]["lr_grid"],
        "lr grid extensions per B (at most)": res["config"].get("lr_extend", 0), "seeds": res["config"]["seeds"], "budget (samples)": r["budget"],
        "budget (steps)": r["budget_steps"], "evaluation every": f"max({r['eval_every_samples']} samples, {r['eval_every_steps']} steps)",
        "optimizer": res["config"]["optimizer"] or "workload default",
    }
    parts.append("<h2>Settings</h2><table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()) + "</table>")
    parts.append("<p>Method: Shallue et al. 2018, <i>Measuring the Effects of Data Parallelism on Neural Network Training</i>; "
                 "McCandlish et al. 2018, <i>An Empirical Model of Large-Batch Training</i>. Each batch size is compared at "
                 "its own best learning rate from the grid, extended (×2 or ÷2) where the best was at its edge.</p></body></html>")
    return "\n".join(parts)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when interrupted mid-write


def write_outputs(results: dict[str, Any], out: str | Path) -> None:
    """PNG plots, ``results.json`` and ``report.html`` into ``out``, each written atomically."""
    from bigbatch.train.checkpoint import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = make_plots(results, out)
    write_json_atomic(results, out / "results.json")
    _write_text_atomic(render_html(results, pngs), out / "report.html")

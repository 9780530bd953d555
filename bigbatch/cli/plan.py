"""``bigbatch plan``: from a study's measured trade-off to a batch size, a GPU count, a time and a cost.

Every flag mirrors a :class:`bigbatch.plan.PlanConfig` field. Text output: the fit, the knee
B = B_noise, and a table of candidates for the selected target (one summary line per other
target); ``--json`` prints everything (``candidates`` for the selected target, ``targets`` for
all); ``--plot`` draws the time–compute frontier; ``--write-schedule`` writes a batch schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "plan_command", "format_plan", "plot_frontier"]


def _ints(flag: str, text: Optional[str]) -> list[int] | None:
    if text is None:
        return None
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated positive integers, e.g. 1,2,4,8, got {text!r}") from None
    if not out or any(x <= 0 for x in out):
        raise ValueError(f"{flag} must be comma-separated positive integers, e.g. 1,2,4,8, got {text!r}")
    return out


def _g(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.4g}{unit}"


def format_plan(res) -> str:
    """The plan as text: header, fit, knee, candidate table, marks, other targets, notes."""
    from bigbatch.plan.study import target_text
    from bigbatch.plan.tradeoff import format_duration

    st, sel = res.study, res.selected
    f = sel.fit
    metric = st.metric_name or "metric"
    lines = [f"study: {st.source}" + (f" ({st.workload})" if st.workload else "")]
    iv = f"  [{f.b_crit_interval[0]:.4g}, {f.b_crit_interval[1]:.4g}]" if f.b_crit_interval else ""
    lines.append(
        f"target {metric} {target_text(f.target)}: B_noise = B_crit = {f.b_noise:.4g}{iv}   S_min = {f.s_min:.4g} steps   "
        f"E_min = {f.e_min:.4g} samples" + (f"   B_simple = {f.b_simple:.4g}" if f.b_simple else "")
    )
    k = sel.knee
    lines.append(
        f"knee: B = B_noise = {k['batch_size']:.4g} needs S = 2·S_min = {k['steps']:.4g} steps and "
        f"E = 2·E_min = {k['samples']:.4g} samples"
    )
    if res.throughput is not None:
        src = res.throughput_info or {}
        how = (f"from {src['run']}: median of {src['records']} {'steady ' if src.get('steady') else ''}train records "
               f"/ world size {src['world_size']}") if "run" in src else "from --throughput"
        lines.append(f"throughput: {res.throughput:.4g} samples/s per GPU ({how}), efficiency {res.efficiency:g}, "
                     f"micro-batch {res.micro_batch}")
    timed = res.throughput is not None
    head = ["batch"] + (["gpus"] if timed else []) + ["steps", "samples"] + (["wall", "GPU-hours"] if timed else []) + ["mark"]
    rows = []
    for c in sel.candidates:
        mark = []
        if sel.fastest is c:
            mark.append(f"fastest within {res.budget_gpu_hours:g} GPU-h")
        if sel.cheapest is c:
            mark.append(f"cheapest within {format_duration(res.deadline_seconds)}")
        row = [str(c.batch_size)] + ([str(c.gpus)] if timed else []) + [_g(c.steps), _g(c.samples)]
        if timed:
            row += [format_duration(c.wall_seconds), _g(c.gpu_hours)]
        rows.append(row + [", ".join(mark)])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.rjust(w) if i < len(head) - 1 else v for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines.append(fmt(head).rstrip())
    lines += [fmt(r).rstrip() for r in rows]
    for p in res.plans:
        if p is sel:
            continue
        lines.append(
            f"other target {target_text(p.fit.target)}: B_noise = {p.fit.b_noise:.4g}, S_min = {p.fit.s_min:.4g}, "
            f"E_min = {p.fit.e_min:.4g} (--target {target_text(p.fit.target)} for its table)"
        )
    for u in res.undetermined:
        lines.append(f"target {target_text(u.target)}: B_crit undetermined ({u.reason}); no plan")
    if res.schedule is not None:
        lines.append(f"schedule: {res.schedule.text()}")
        lines += [f"note: {n}" for n in res.schedule.notes]
    lines += [f"note: {n}" for n in sel.notes + res.notes]
    return "\n".join(lines)


def plot_frontier(res, path: Path, points: int = 300) -> Path:
    """Steps against samples (log–log) along S(B), E(B) for each target; the candidates and the knee on the selected one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bigbatch.plan.study import target_text

    sel = res.selected
    fig, ax = plt.subplots(figsize=(7, 5))
    for p in res.plans:
        f = p.fit
        bs = np.geomspace(f.b_noise / 2 ** 8, f.b_noise * 2 ** 8, points)
        s = f.s_min * (1 + f.b_noise / bs)
        e = f.e_min * (1 + bs / f.b_noise)
        main = p is sel
        ax.plot(e, s, "-" if main else ":", color="C0" if main else "0.6", lw=2 if main else 1,
                label=f"target {target_text(f.target)}: B_noise {f.b_noise:.3g}")
    f = sel.fit
    seen = {}
    for c in sel.candidates:
        seen.setdefault(c.batch_size, c)
    xs = [c.samples for c in seen.values()]
    ys = [c.steps for c in seen.values()]
    ax.scatter(xs, ys, color="C1", zorder=3, label="candidates")
    for c in seen.values():
        ax.annotate(f"B={c.batch_size}", (c.samples, c.steps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    k = sel.knee
    ax.scatter([k["samples"]], [k["steps"]], marker="*", s=160, color="C3", zorder=4,
               label=f"B = B_noise: 2·S_min, 2·E_min")
    ax.axhline(f.s_min, color="C0", ls="--", lw=0.8)
    ax.axvline(f.e_min, color="C0", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples to target E (compute)")
    ax.set_ylabel("optimizer steps to target S (time)")
    ax.set_title("time–compute frontier: (S/S_min − 1)(E/E_min − 1) = 1")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plan_command(
    study: Optional[Path] = typer.Option(None, help="Study directory (or its results.json) from `bigbatch study`."),
    target: Optional[float] = typer.Option(None, help="Target to plan for when the study measured several (default: the hardest)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Batch sizes to add to the candidates, e.g. 96,192."),
    span: int = typer.Option(4, help="Octaves either side of B_noise covered by the power-of-two candidates."),
    gpus: Optional[str] = typer.Option(None, help="GPU counts, e.g. 1,2,4,8 (default 1,2,4,8; needs a throughput)."),
    micro_batch: Optional[int] = typer.Option(None, help="Per-GPU micro-batch the throughput holds at: B/G must be a multiple (default: the --throughput-from run's, else 1)."),
    throughput: Optional[float] = typer.Option(None, help="Per-GPU throughput in samples/s."),
    throughput_from: Optional[Path] = typer.Option(None, help="A `bigbatch train` run dir: median steady samples_per_s / world size."),
    efficiency: float = typer.Option(1.0, help="Scaling efficiency in (0, 1]."),
    budget_gpu_hours: Optional[float] = typer.Option(None, help="Mark the fastest candidate within this many GPU-hours."),
    deadline: Optional[str] = typer.Option(None, help="Mark the cheapest candidate within this wall time (90m, 2h, 3600s)."),
    write_schedule: Optional[Path] = typer.Option(None, help="Write a batch-size schedule grown through B_crit of each target."),
    factor: float = typer.Option(1.0, help="Schedule batch = factor x B_crit at each target."),
    granularity: Optional[int] = typer.Option(None, help="Schedule batches are multiples of this (default micro-batch x max --gpus)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Draw the time-compute frontier to this PNG."),
) -> None:
    """Plan a run from a study: batch size, GPUs, steps, samples, wall time, GPU-hours, schedule."""
    from bigbatch.plan import PlanConfig, plan_study

    cfg = PlanConfig(
        study=study, target=target, batch_sizes=_ints("--batch-sizes", batch_sizes) or [], span=span,
        gpus=_ints("--gpus", gpus), micro_batch=micro_batch, throughput=throughput, throughput_from=throughput_from,
        efficiency=efficiency, budget_gpu_hours=budget_gpu_hours, deadline=deadline, write_schedule=write_schedule,
        factor=factor, granularity=granularity, json=as_json, plot=plot,
    )
    if cfg.span < 0 or cfg.span > 16:
        raise ValueError(f"--span must be in [0, 16], got {cfg.span}")
    res = plan_study(cfg)
    if cfg.write_schedule is not None:
        cfg.write_schedule.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_schedule.write_text(res.schedule.file_text(str(cfg.study)))
    if cfg.plot is not None:
        plot_frontier(res, cfg.plot)
    if cfg.json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    typer.echo(format_plan(res))
    if cfg.write_schedule is not None:
        typer.echo(f"schedule file: {cfg.write_schedule}")
    if cfg.plot is not None:
        typer.echo(f"plot:          {cfg.plot}")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)

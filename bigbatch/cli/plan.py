"""``bigbatch plan``: from a study's measured trade-off to a batch size, a GPU count, a time and a cost.

Every flag mirrors a :class:`bigbatch.plan.PlanConfig` field. Text output: the fit, the knee
B = B_noise, and a table of candidates for the selected target (one summary line per other
target); ``--json`` prints everything (``candidates`` for the selected target, ``targets`` for
all); ``--plot`` draws the time–compute frontier; ``--write-schedule`` writes a batch schedule.

Without ``--study``, ``--params N --tokens D`` (``--target-loss L``, ``--seq-len S``, ``--ref-lr``/``--ref-tokens``) print the
published priors instead: each estimate with its source, conditions and fitted range, and a
warning when an input is outside that range (``--json``: ``{"mode": "priors", "priors": [...]}``).
"""

from __future__ import annotations

import json
from pathlib import Path
import typer

from bigbatch.cli._fields import Flag, build_command, flag_errors, flags_for
from bigbatch._files import check_output_file, writing

__all__ = ["register", "plan_command", "plan_flags", "format_plan", "format_priors", "plot_frontier"]


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


def format_priors(res) -> str:
    """The published priors as text: inputs, then per quantity each estimate with source, conditions, range."""
    from bigbatch.plan.priors import INPUTS

    inputs = [f"{INPUTS[k][0]} {v:.4g}" for k, v in (("params", res.params), ("tokens", res.tokens),
                                                     ("target_loss", res.target_loss), ("ref_lr", res.ref_lr),
                                                     ("ref_tokens", res.ref_tokens)) if v is not None]
    if res.seq_len is not None:
        inputs.append(f"--seq-len {res.seq_len}")
    lines = ["published priors (no study): " + ", ".join(inputs)]
    for quantity, title in (("batch_size", "optimal batch size"), ("lr", "optimal learning rate")):
        lines.append(f"{title}:")
        for e in res.estimates:
            p = e.prior
            if p.quantity != quantity:
                continue
            if e.value is None:
                need = " and ".join(INPUTS[k][0] for k in e.missing)
                lines.append(f"  {p.name}: needs {need} ({p.formula}; {p.source})")
                continue
            seq = f" = {e.sequences:.4g} sequences of {res.seq_len}" if e.sequences is not None else ""
            value = f" = {e.value:.4g}" if p.needs else ""  # a constant prior's formula is its value
            lines.append(f"  {p.name}: {p.formula}{value} ({p.unit}){seq}")
            lines.append(f"    source: {p.source}")
            lines.append(f"    conditions: {p.conditions}")
            lines.append("    fitted on: " + "; ".join(f"{r.label()[1]} {r.text()} ({r.what})" for r in p.ranges)
                         if p.ranges else "    fitted on: -")
            for m in e.outside:
                lines.append(f"    OUTSIDE THE FITTED RANGE: {m}; this is an extrapolation")
            lines += [f"    note: {n}" for n in p.notes]
    lines += [f"note: {n}" for n in res.notes]
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
               label="B = B_noise: 2·S_min, 2·E_min")
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


def _run(given: dict) -> None:
    from bigbatch.plan import PlanConfig, plan_priors, plan_study
    from bigbatch.plan.planner import PRIOR_FIELDS

    with flag_errors(_FLAGS):
        paths = {"study", "throughput_from", "write_schedule", "plot"}  # Path fields take text on the command line
        cfg = PlanConfig(**{k: Path(v) if k in paths else v for k, v in given.items()})
        if cfg.study is None and any(k in given for k in PRIOR_FIELDS):
            res = plan_priors(cfg)
            typer.echo(json.dumps(res.to_dict(), indent=2) if cfg.json else format_priors(res))
            return
        if cfg.span < 0 or cfg.span > 16:
            raise ValueError(f"span must be in [0, 16], got {cfg.span}")
        for name in ("write_schedule", "plot"):
            if getattr(cfg, name) is not None:
                check_output_file(Path(getattr(cfg, name)), flag_name(name))
        res = plan_study(cfg)
    if cfg.write_schedule is not None:
        with writing("--write-schedule", Path(cfg.write_schedule)):
            Path(cfg.write_schedule).write_text(res.schedule.file_text(str(cfg.study)))
    if cfg.plot is not None:
        with writing("--plot", Path(cfg.plot)):
            plot_frontier(res, Path(cfg.plot))
    if cfg.json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    typer.echo(format_plan(res))
    if cfg.write_schedule is not None:
        typer.echo(f"schedule file: {cfg.write_schedule}")
    if cfg.plot is not None:
        typer.echo(f"plot:          {cfg.plot}")


def plan_flags() -> list[Flag]:
    """The flags of ``bigbatch plan``: one per :class:`bigbatch.plan.PlanConfig` field."""
    from bigbatch.plan import PlanConfig

    return flags_for(PlanConfig)


def flag_name(field: str) -> str:
    """The flag of a PlanConfig field (``write_schedule`` → ``--write-schedule``)."""
    return next(f.name for f in _FLAGS if f.field == field)


_FLAGS = plan_flags()
plan_command = build_command(_FLAGS, _run, doc=(
    "Plan a run from a study: batch size, GPUs, steps, samples, wall time, GPU-hours, schedule.\n\n"
    "Without --study, --params N --tokens D (and --target-loss L, --seq-len S, --ref-lr/--ref-tokens) print "
    "the published priors for the optimal batch size and LR, with their sources and fitted ranges."))


def register(app: typer.Typer) -> None:
    """Add ``bigbatch plan`` to ``app``."""
    app.command("plan")(plan_command)

"""``bigbatch study``: every flag mirrors a StudyConfig field; a TOML file (``--config``) can hold them all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

__all__ = ["register", "study_command", "parse_int_list", "parse_float_list"]


def parse_int_list(flag: str, text: str) -> list[int]:
    """``"16,32,64"`` → ``[16, 32, 64]``; anything else is a one-line error naming the flag."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    lowest = 0 if flag == "--seeds" else 1  # seeds may be 0; batch sizes may not
    if not vals or any(v < lowest for v in vals):
        what = "integers >= 0" if lowest == 0 else "positive integers"
        raise ValueError(f"{flag} must be a comma-separated list of {what}, e.g. 16,32,64; got {text!r}")
    return vals


def parse_float_list(flag: str, text: str) -> list[float]:
    """``"0.5,1,2"`` → ``[0.5, 1.0, 2.0]`` (each > 0 and finite)."""
    import math

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or not all(v > 0 and math.isfinite(v) for v in vals):
        raise ValueError(f"{flag} must be a comma-separated list of numbers > 0, e.g. 0.5,1,2; got {text!r}")
    return vals


def config_from_options(config: Optional[Path], options: dict[str, Any]):
    """A StudyConfig from an optional TOML file overlaid with the flags the user gave."""
    from bigbatch.study import StudyConfig

    cfg = StudyConfig.from_toml(config) if config is not None else StudyConfig()
    return dataclasses.replace(cfg, **{k: v for k, v in options.items() if v is not None})


def study_command(
    workload: Optional[str] = typer.Option(None, help="mnist1d (default), bytelm, linreg, or module:factory for your own."),
    workload_arg: Optional[list[str]] = typer.Option(None, "--workload-arg", "-w", help="key=value passed to the workload (repeatable)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma-separated batch sizes, e.g. 16,32,64,128."),
    lr: Optional[float] = typer.Option(None, help="Learning rate at --base-batch-size."),
    base_batch_size: Optional[int] = typer.Option(None, help="Batch size at which --lr was tuned."),
    rule: Optional[str] = typer.Option(None, help="LR scaling rule from --base-batch-size: linear, sqrt, none, legw, adam-sqrt."),
    lr_grid: Optional[str] = typer.Option(None, help="Multipliers of the rule's LR tried at every batch size, e.g. 0.5,1,2."),
    lr_extend: Optional[int] = typer.Option(None, help="Where the best LR is at the grid's edge, try up to N more multipliers (x2 or /2) there (default 2; 0: grid only)."),
    optimizer: Optional[str] = typer.Option(None, help="Optimizer (default: the workload's)."),
    momentum: Optional[float] = typer.Option(None, help="Momentum (sgd, lars)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay."),
    warmup_samples: Optional[int] = typer.Option(None, help="Linear LR warmup in samples."),
    target: Optional[float] = typer.Option(None, help="Metric value to reach (in the workload's direction)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2."),
    budget: Optional[int] = typer.Option(None, help="Per-cell budget in samples."),
    budget_steps: Optional[int] = typer.Option(None, help="Per-cell budget in optimizer steps."),
    eval_every_samples: Optional[int] = typer.Option(None, help="Evaluate at least this many samples apart."),
    eval_every_steps: Optional[int] = typer.Option(None, help="Evaluate at least this many steps apart."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda (cells run one per GPU), cuda:N."),
    jobs: Optional[int] = typer.Option(None, help="Cells at once, each in its own process (0: one per GPU with cuda, else 1)."),
    out: Optional[str] = typer.Option(None, help="Run directory (default runs/study); re-running continues it."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap resamples for the B_crit interval."),
    confidence: Optional[float] = typer.Option(None, help="Coverage of the B_crit interval, e.g. 0.9."),
    progress: Optional[str] = typer.Option(None, help="auto, bar, lines, none."),
    config: Optional[Path] = typer.Option(None, help="TOML file with StudyConfig fields; flags override it."),
) -> None:
    """Measure the critical batch size: steps/samples to a target vs batch size, fit, plots, report.html."""
    from bigbatch.study import run_study
    from bigbatch.workloads import parse_workload_args

    options: dict[str, Any] = dict(
        workload=workload, lr=lr, base_batch_size=base_batch_size, rule=rule, lr_extend=lr_extend, optimizer=optimizer, momentum=momentum,
        weight_decay=weight_decay, warmup_samples=warmup_samples, target=target, budget=budget, budget_steps=budget_steps,
        eval_every_samples=eval_every_samples, eval_every_steps=eval_every_steps, device=device, jobs=jobs, out=out,
        bootstrap=bootstrap, confidence=confidence, progress=progress,
    )
    if batch_sizes is not None:
        options["batch_sizes"] = parse_int_list("--batch-sizes", batch_sizes)
    if lr_grid is not None:
        options["lr_grid"] = parse_float_list("--lr-grid", lr_grid)
    if seeds is not None:
        options["seeds"] = parse_int_list("--seeds", seeds)
    cfg = config_from_options(config, options)
    if workload_arg:
        cfg = dataclasses.replace(cfg, workload_args={**cfg.workload_args, **parse_workload_args(workload_arg)})
    try:
        res = run_study(cfg)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: finished cells are kept in {cfg.out}; re-run the same command to continue", err=True)
        raise typer.Exit(130)
    outdir = Path(res["out"])
    if res["b_crit"] is not None:
        iv = res["b_crit_interval"]
        ivs = f" ({res['confidence']:.0%} interval {iv[0]:.0f}–{iv[1]:.0f})" if iv else ""
        typer.echo(f"B_crit = {res['b_crit']:.0f}{ivs}; S_min = {res['s_min']:.0f} steps, E_min = {res['e_min']:.4g} samples")
    else:
        typer.echo("B_crit: not fitted")
    bs = res["b_simple"]
    if bs is None:
        typer.echo("B_simple: not measured (no noise-monitor readings in the runs)")
    else:
        ratio = f"; B_crit / B_simple = {res['b_crit'] / bs:.2f}" if res.get("b_crit") else ""
        typer.echo(f"B_simple = {bs:.0f} (noise monitor, median over runs, {res.get('b_simple_source')}){ratio}")
    extended = [f"B={row['batch_size']} " + ",".join(f"x{m:g}" for m in row["lr_extensions"])
                for row in res["batch_sizes"] if row.get("lr_extensions")]
    if extended:
        typer.echo(f"lr grid extended where its best was at the edge: {'; '.join(extended)}")
    for note in res["notes"]:
        if not note.startswith("B_simple"):  # already said on the line above
            typer.echo(f"note: {note}")
    typer.echo(f"report:  {outdir / 'report.html'}")
    typer.echo(f"results: {outdir / 'results.json'}")


def register(app: typer.Typer) -> None:
    app.command("study")(study_command)

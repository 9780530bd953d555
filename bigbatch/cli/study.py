"""``bigbatch study``: its flags are generated from StudyConfig, one per field.

``-w`` is a short spelling of ``--workload-arg``; ``--config FILE`` (a TOML file of StudyConfig
fields, which the flags override) is the one flag that is not a field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from bigbatch.cli._fields import Flag, build_command, config_option, flag_errors, flags_for, load_config
from bigbatch.study.config import StudyConfig

__all__ = ["register", "study_command", "study_flags", "config_from_options"]


FLAG_NAMES: dict[str, tuple[str, ...]] = {"workload_args": ("--workload-arg", "-w")}
"""Flags spelled other than ``--field-name``."""


def study_flags(config_cls: type = StudyConfig) -> list[Flag]:
    """The flags of ``bigbatch study``: one per field of ``config_cls``."""
    return flags_for(config_cls, decls=FLAG_NAMES)


def config_from_options(config: Optional[Path], options: dict[str, Any]) -> StudyConfig:
    """A StudyConfig from an optional TOML file overlaid with the given flags (None = not given)."""
    return load_config(StudyConfig, config, {k: v for k, v in options.items() if v is not None})


def _run(given: dict[str, Any], *, config: Optional[Path]) -> None:
    from bigbatch.study import run_study

    cfg = load_config(StudyConfig, config, given)
    with flag_errors(_FLAGS):
        cfg = cfg.resolve()
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
    elif res.get("b_crit_undetermined"):
        typer.echo(f"B_crit: undetermined ({res['b_crit_undetermined']})")
    else:
        typer.echo("B_crit: not fitted")
    for e in res.get("by_target") or []:
        if e.get("b_crit") is not None:
            iv = e.get("b_crit_interval")
            ivs = f" (interval {iv[0]:.0f}–{iv[1]:.0f})" if iv else ""
            bsim = f", B_simple {e['b_simple']:.0f}" if e.get("b_simple") else ""
            typer.echo(f"  target {e['target']:g}: B_crit {e['b_crit']:.0f}{ivs}{bsim}")
        else:
            typer.echo(f"  target {e['target']:g}: B_crit undetermined ({e.get('b_crit_undetermined') or 'not fitted'})")
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
        if not note.startswith(("B_simple", "B_crit undetermined")):  # already said above
            typer.echo(f"note: {note}")
    t = res.get("timing") or {}
    if t.get("cells"):
        per_gpu = f", {t['cells_per_gpu']} per GPU" if t.get("cells_per_gpu") else ""
        typer.echo(f"{t['cells']} cells trained in {t['wall_seconds'] / 60:.1f} min: {t['cells_per_hour']:.0f} cells/hour "
                   f"({t['workers']} worker(s){per_gpu})")
    typer.echo(f"report:  {outdir / 'report.html'}")
    typer.echo(f"results: {outdir / 'results.json'}")


_FLAGS = study_flags()
study_command = build_command(_FLAGS, _run, extra=[config_option("StudyConfig")], doc=(
    "Measure the critical batch size: steps/samples to a target vs batch size, fit, plots, report.html."))


def register(app: typer.Typer) -> None:
    """Add ``bigbatch study`` to ``app``."""
    app.command("study")(study_command)

"""``bigbatch scale``: move a recipe to another batch size and say why each number changed.

Every recipe flag mirrors a :class:`bigbatch.scaling.Recipe` field (``--from-batch`` is
``batch_size``); ``--to-batch`` is the target. ``--json`` prints ``{"old", "new", "reasons",
...}``; ``--out`` writes the new recipe as TOML; ``--plot`` draws both LR curves on one axis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer

__all__ = ["register", "scale_command", "recipe_from_options", "format_table", "plot_schedules"]


def _floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def recipe_from_options(recipe: Optional[Path], options: dict[str, Any]):
    """A Recipe from an optional TOML file overlaid with the flags given (None = not given)."""
    from bigbatch.scaling import Recipe

    given = {k: v for k, v in options.items() if v is not None}
    if "betas" in given:
        b = _floats("--betas", given["betas"])
        if len(b) != 2:
            raise ValueError(f"--betas must be two numbers like 0.9,0.999, got {given['betas']!r}")
        given["betas"] = b
    if "milestones" in given:
        given["milestones"] = _floats("--milestones", given["milestones"])
    if recipe is not None:
        if not recipe.is_file():
            raise FileNotFoundError(f"--recipe file not found: {recipe}")
        return Recipe.from_dict({**Recipe.from_toml(recipe).to_dict(), **given})
    missing = [f"--{n}" for n, key in (("from-batch", "batch_size"), ("lr", "lr")) if key not in given]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (or give --recipe FILE)")
    return Recipe(**given)


def _num(v: Any) -> str:
    """3 significant digits, more when 3 would hide the value (0.9999 is not 1)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, tuple):
            return "(" + ", ".join(_num(x) for x in v) + ")"
        return "-" if v is None else str(v)
    if isinstance(v, int) or v == 0 or not math.isfinite(v):
        return str(v)
    for p in range(3, 13):
        s = f"{v:.{p}g}"
        if abs(float(s) - v) <= 1e-3 * abs(v) and float(s) not in (0.0, 1.0):
            return s
    return repr(v)


def format_table(res) -> str:
    """Old and new recipe side by side, one row per field with its reason."""
    rows = [(c.field, _num(c.old), _num(c.new), c.reason) for c in res.changes]
    seen = {c.field for c in res.changes}
    old, new = res.old, res.recipe
    extra = ["optimizer", "momentum", "schedule", "warmup", "budget_epochs", "dataset_size", "milestones"]
    for name in extra:
        if name in seen or getattr(old, name) in (None, ()):
            continue
        rows.append((name, _num(getattr(old, name)), _num(getattr(new, name)), "unchanged"))
    if old.dataset_size is not None:
        rows.append(("warmup_samples", _num(old.warmup_samples), _num(new.warmup_samples), "warmup_epochs x dataset_size"))
    w = [max(len(r[i]) for r in rows + [("field", "old", "new", "")]) for i in range(3)]
    lines = [f"rule: {res.rule}   k = {_num(res.k)}"]
    lines.append(f"{'field':<{w[0]}}  {'old':>{w[1]}}  {'new':>{w[2]}}  reason")
    lines += [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def plot_schedules(res, path: Path, points: int = 400) -> Path:
    """LR against samples (epochs when the dataset size is unknown) for the old and new recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old, new = res.old, res.recipe
    end = old.budget_epochs or max(3 * max(old.warmup_epochs, new.warmup_epochs), 1.2 * max(old.milestones + new.milestones + (0.0,)), 1.0)
    per = old.dataset_size or 1
    xs = [end * i / (points - 1) for i in range(points)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, style in ((old, "-"), (new, "--")):
        ax.plot([x * per for x in xs], [r.lr_at_epoch(x) for x in xs], style, label=f"batch {r.batch_size}: peak lr {_num(r.lr)}")
    ax.set_xlabel("samples seen" if old.dataset_size else "epochs")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{old.schedule} schedule, rule {res.rule} (k = {_num(res.k)})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scale_command(
    to_batch: Optional[int] = typer.Option(None, "--to-batch", help="Batch size to move the recipe to."),
    from_batch: Optional[int] = typer.Option(None, "--from-batch", help="Batch size the recipe was tuned at (Recipe.batch_size)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate at --from-batch."),
    optimizer: Optional[str] = typer.Option(None, help="sgd, lars, adam, adamw, lamb, merit (decides the default rule)."),
    rule: Optional[str] = typer.Option(None, help="linear, sqrt, legw, adam-sqrt, none (default: per optimizer)."),
    momentum: Optional[float] = typer.Option(None, help="Momentum (sgd, lars)."),
    betas: Optional[str] = typer.Option(None, help="Adam betas, e.g. 0.9,0.999."),
    eps: Optional[float] = typer.Option(None, help="Adam epsilon."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay."),
    dataset_size: Optional[int] = typer.Option(None, help="Samples per epoch (to show lengths in samples)."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Warmup length in epochs."),
    warmup: Optional[str] = typer.Option(None, help="Warmup shape: linear, exponential, none."),
    warmup_start_factor: Optional[float] = typer.Option(None, help="LR at warmup start as a fraction of the peak."),
    budget_epochs: Optional[float] = typer.Option(None, help="Training length in epochs."),
    schedule: Optional[str] = typer.Option(None, help="constant, poly, exp, multistep, cosine, wsd, power."),
    poly_power: Optional[float] = typer.Option(None, help="Power of the poly decay."),
    exp_gamma: Optional[float] = typer.Option(None, help="LR factor per epoch of the exp decay."),
    milestones: Optional[str] = typer.Option(None, help="multistep milestones in epochs, e.g. 30,60,80."),
    gamma: Optional[float] = typer.Option(None, help="multistep factor at each milestone."),
    min_lr_ratio: Optional[float] = typer.Option(None, help="LR floor as a fraction of the peak."),
    decay_fraction: Optional[float] = typer.Option(None, help="wsd/power: final decay fraction of the budget."),
    wsd_decay_shape: Optional[str] = typer.Option(None, help="wsd/power final decay: linear, cosine, sqrt."),
    power_a: Optional[float] = typer.Option(None, help="power schedule: a in min(lr, a*n^b)."),
    power_b: Optional[float] = typer.Option(None, help="power schedule: b in min(lr, a*n^b)."),
    ema_decay: Optional[float] = typer.Option(None, help="Per-step model-EMA decay at --from-batch."),
    recipe: Optional[Path] = typer.Option(None, help="TOML file with Recipe fields; flags override it."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {old, new, reasons, ...}."),
    out: Optional[Path] = typer.Option(None, help="Write the new recipe to this TOML file."),
    plot: Optional[Path] = typer.Option(None, help="Draw the old and new LR curves to this PNG."),
) -> None:
    """Rescale a recipe to another batch size: LR, warmup, betas/eps, EMA, with the reason for each."""
    from bigbatch._checks import check_int_positive
    from bigbatch.scaling import rescale

    if to_batch is None:
        raise ValueError("--to-batch is required (the batch size to move the recipe to)")
    check_int_positive("--to-batch", to_batch)
    options = dict(
        batch_size=from_batch, lr=lr, optimizer=optimizer, momentum=momentum, betas=betas, eps=eps,
        weight_decay=weight_decay, dataset_size=dataset_size, warmup_epochs=warmup_epochs, warmup=warmup,
        warmup_start_factor=warmup_start_factor, budget_epochs=budget_epochs, schedule=schedule,
        poly_power=poly_power, exp_gamma=exp_gamma,
        milestones=milestones, gamma=gamma, min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction,
        wsd_decay_shape=wsd_decay_shape, power_a=power_a, power_b=power_b, ema_decay=ema_decay,
    )
    res = rescale(recipe_from_options(recipe, options), to_batch, rule)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(res.recipe.to_toml())
    if plot is not None:
        plot_schedules(res, plot)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    typer.echo(format_table(res))
    if out is not None:
        typer.echo(f"new recipe: {out}")
    if plot is not None:
        typer.echo(f"plot:       {plot}")


def register(app: typer.Typer) -> None:
    app.command("scale")(scale_command)

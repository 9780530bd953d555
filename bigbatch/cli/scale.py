"""``bigbatch scale``: move a recipe to another batch size and say why each number changed.

The flags are generated from two dataclasses: every field of :class:`bigbatch.scaling.Recipe`
(the recipe being moved; ``--from-batch`` is its ``batch_size``) and every field of
:class:`ScaleConfig` (what to do with it: ``--to-batch``, ``--rule``, ``--b-noise``, ``--recipe FILE``,
``--json``, ``--out``, ``--plot``). ``--json`` prints ``{"old", "new", "reasons", ...}``;
``--out`` writes the new recipe as TOML; ``--plot`` draws both LR curves on one axis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import typer

from bigbatch._checks import check_choice, check_int_positive, check_positive
from bigbatch._config import ConfigMixin
from bigbatch.cli._fields import Flag, build_command, flag_errors, flags_for
from bigbatch._files import check_output_file, writing
from bigbatch.recipe import Recipe
from bigbatch.rules import RULES
from bigbatch.scaling import BETAS_RULES, WEIGHT_DECAY_RULES

__all__ = [
    "register", "scale_command", "scale_flags", "ScaleConfig", "recipe_from_options", "format_table", "plot_schedules",
]

#: Flags spelled other than ``--field-name`` (the recipe's batch size is where it comes from).
FLAG_NAMES: dict[str, tuple[str, ...]] = {"batch_size": ("--from-batch",)}


@dataclass(kw_only=True, slots=True)
class ScaleConfig(ConfigMixin):
    """What ``bigbatch scale`` does with the recipe its other flags (the Recipe fields) describe."""

    to_batch: int | None = None
    """Batch size to move the recipe to (required)."""
    rule: str | None = None
    """Scaling rule: linear, sqrt, legw, adam-sqrt, none (default: the optimizer's)."""
    b_noise: float | None = None
    """Noise scale B_noise in samples (e.g. B_crit from ``bigbatch study``): warn when an Adam-family recipe is
    scaled by sqrt/adam-sqrt past it, where the best LR falls (Li et al. 2024, Surge). Not given: no such check."""
    weight_decay_rule: str = "keep"
    """keep, or timescale: move the weight decay so that AdamW's timescale batch/(lr*wd) stays fixed in samples,
    wd' = wd*k*lr/lr' (Wang & Aitchison 2024; Bergsma et al. 2025). Decoupled decay only (adamw, lamb, merit)."""
    betas_rule: str | None = None
    """sde (1 - beta x k, both betas: Malladi et al. 2022) or half-life (beta2^k, beta1 kept: Marek et al. 2025);
    default: the rule's own (sde under adam-sqrt, betas kept otherwise). Adam-family optimizers only."""
    seesaw: str | None = None
    """Write the Seesaw batch schedule of the new recipe to this file (Meterez et al. 2025: batch x2 where the LR would
    halve, trained with --rule sqrt; needs --dataset-size and a decaying --schedule); --batch-schedule reads it."""
    seesaw_max_batch: int | None = None
    """Largest batch the --seesaw schedule may reach."""
    study: str | None = None
    """Study directory (or its results.json): the --seesaw schedule warns where its batch passes the study's B_crit."""
    recipe: str | None = None
    """TOML file with Recipe fields (top-level keys or a [recipe] table); flags override it."""
    json: bool = False
    """Print JSON: {old, new, reasons, ...} instead of the table."""
    out: str | None = None
    """Write the new recipe to this TOML file."""
    plot: str | None = None
    """Draw the old and new LR curves to this PNG."""

    def resolve(self) -> "ScaleConfig":
        """Check every field; a bad value raises ``ValueError`` naming the field. Returns ``self``."""
        if self.to_batch is None:
            raise ValueError("to_batch is required (the batch size to move the recipe to)")
        check_int_positive("to_batch", self.to_batch)
        if self.rule is not None:
            check_choice("rule", self.rule, RULES)
        if self.b_noise is not None:
            check_positive("b_noise", self.b_noise)
        check_choice("weight_decay_rule", self.weight_decay_rule, WEIGHT_DECAY_RULES)
        if self.seesaw_max_batch is not None:
            check_int_positive("seesaw_max_batch", self.seesaw_max_batch)
        if self.seesaw is None and (self.seesaw_max_batch is not None or self.study is not None):
            raise ValueError(f"{'seesaw_max_batch' if self.seesaw_max_batch is not None else 'study'} is read only "
                             "when seesaw is given (the file the Seesaw batch schedule is written to)")
        if self.betas_rule is not None:
            check_choice("betas_rule", self.betas_rule, BETAS_RULES)
        return self


def _floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def recipe_from_options(recipe: Optional[Path], options: dict[str, Any]):
    """A Recipe from an optional TOML file overlaid with the flags given (None = not given)."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(given.get("betas"), str):
        given["betas"] = _floats("--betas", given["betas"])
    if isinstance(given.get("milestones"), str):
        given["milestones"] = _floats("--milestones", given["milestones"])
    if "betas" in given and len(given["betas"]) != 2:
        raise ValueError(f"betas must be two numbers like 0.9,0.999, got {given['betas']!r}")
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


def scale_flags() -> list[Flag]:
    """The flags of ``bigbatch scale``: one per ScaleConfig field, then one per Recipe field."""
    return flags_for(ScaleConfig) + flags_for(Recipe, decls=FLAG_NAMES)


def _seesaw(cfg: ScaleConfig, res):
    """The Seesaw schedule of the new recipe, checked against --b-noise or the study's B_crit."""
    from bigbatch.scaling import seesaw_schedule

    b_crit = cfg.b_noise
    if cfg.study is not None:
        from bigbatch.plan.study import read_study

        b_crit = read_study(cfg.study).hardest().b_noise  # E_min/S_min, as the planner reads it
    return seesaw_schedule(res.recipe, b_crit=b_crit, max_batch=cfg.seesaw_max_batch)


def _run(given: dict[str, Any]) -> None:
    from bigbatch.scaling import rescale

    own = {f.name for f in fields(ScaleConfig)}
    with flag_errors(_FLAGS):
        cfg = ScaleConfig().replace(**{k: v for k, v in given.items() if k in own}).resolve()
        out = None if cfg.out is None else check_output_file(Path(cfg.out), "--out")
        plot = None if cfg.plot is None else check_output_file(Path(cfg.plot), "--plot")
        recipe = None if cfg.recipe is None else Path(cfg.recipe)
        res = rescale(recipe_from_options(recipe, {k: v for k, v in given.items() if k not in own}), cfg.to_batch, cfg.rule,
                      b_noise=cfg.b_noise, weight_decay_rule=cfg.weight_decay_rule, betas_rule=cfg.betas_rule)
        seesaw_out = None if cfg.seesaw is None else check_output_file(Path(cfg.seesaw), "--seesaw")
        if seesaw_out is not None and seesaw_out.exists():
            raise ValueError(f"seesaw {seesaw_out} exists; remove it or name another file (a schedule is not overwritten)")
        seesaw = None if seesaw_out is None else _seesaw(cfg, res)
    if out is not None:
        with writing("--out", out):
            out.write_text(res.recipe.to_toml())
    if plot is not None:
        with writing("--plot", plot):
            plot_schedules(res, plot)
    if seesaw is not None:
        with writing("--seesaw", seesaw_out):
            seesaw_out.write_text(seesaw.text())
    if cfg.json:
        typer.echo(json.dumps({**res.to_dict(), **({"seesaw": seesaw.to_dict()} if seesaw else {})}, indent=2))
        return
    typer.echo(format_table(res))
    if out is not None:
        typer.echo(f"new recipe: {out}")
    if plot is not None:
        typer.echo(f"plot:       {plot}")
    if seesaw is not None:
        typer.echo(f"seesaw:     {seesaw_out} ({','.join(f'{n}:{b}' for n, b in seesaw.schedule)})")
        typer.echo("\n".join(f"note: {n}" for n in seesaw.notes))


_FLAGS = scale_flags()
scale_command = build_command(_FLAGS, _run, doc=(
    "Rescale a recipe to another batch size: LR, warmup, betas/eps, EMA, with the reason for each."))


def register(app: typer.Typer) -> None:
    """Add ``bigbatch scale`` to ``app``."""
    app.command("scale")(scale_command)

"""Scaling rules: move a training recipe tuned at batch ``B`` to batch ``kB`` (docs/design.md, "Units and rules").

A :class:`Recipe` is a frozen record of the hyperparameters that depend on the batch size.
:func:`rescale` returns the recipe for a new batch size together with the reason for every
change. ``k = new batch / old batch``; ``k < 1`` (going down) works too, and every rule is
invertible: ``rescale(rescale(r, kB), B) == r`` up to rounding.

=============  ==================================  ================  =======================================
rule           learning rate                       warmup (epochs)   other
=============  ==================================  ================  =======================================
``linear``     η × k  (Goyal et al. 2017, §2.1)    same              —
``sqrt``       η × √k (Krizhevsky 2014)             same              —
``legw``       η × √k (You et al. 2019, LEGW)      × k               decay stretched to the new warmup end
``adam-sqrt``  η × √k (Malladi et al. 2022, SDE    same              1−β₁, 1−β₂ × k;  ε ÷ √k
               square-root scaling rule)
``none``       same                                same              —
=============  ==================================  ================  =======================================

With ``b_noise`` given, :func:`rescale` checks the "surge" of Li et al. 2024 (*Surge Phenomenon
in Optimal Learning Rate and Batch Size Scaling*, Eq. 2): for Adam-style optimizers the best LR is
ε_max / (½(√(B_noise/B) + √(B/B_noise))), which peaks at B = B_noise (their Eq. 15) and falls
beyond it, so a square-root rule that grows the batch past B_noise overshoots; the new recipe
then carries a note saying by how much (:func:`surge_lr_factor`).

Under every rule the model-EMA decay follows the EMA scaling rule ρ → ρ^k (Busbridge et al.
2023, "How to Scale Your EMA", EMA scaling rule), and the Power scheduler's coefficient ``a`` scales
like η (Shen et al. 2024 make it proportional to the batch size).

The recipe's lengths are in epochs (``dataset_size`` samples each), so the schedule is
batch-size invariant in samples; :class:`ScalingPlan` is the per-step helper a training loop
with a changing batch size uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bigbatch._checks import check_choice, check_int_positive, check_positive
from bigbatch.optim.factory import OPTIMIZERS, optimizer_info
from bigbatch.recipe import _NEEDS_BUDGET, Recipe

__all__ = [
    "RULES", "Recipe", "Change", "Rescaled", "ScalingPlan",
    "rescale", "default_rule", "family", "lr_factor", "surge_lr_factor", "SURGE_RULES",
]

SURGE_RULES = ("sqrt", "adam-sqrt")
"""The square-root rules whose LR the surge check compares with Li et al. 2024's curve."""

RULES: dict[str, str] = {
    "linear": "Goyal et al. 2017, linear scaling rule (§2.1)",
    "sqrt": "Krizhevsky 2014, square-root scaling ('One weird trick')",
    "legw": "You et al. 2019, LEGW: sqrt LR scaling with linear-epoch gradual warmup",
    "adam-sqrt": "Malladi et al. 2022, SDE square-root scaling rule for Adam",
    "none": "no scaling",
}
"""Rule name → the paper it comes from."""


def family(optimizer: str) -> str:
    """The optimizer's family (``"sgd"``, ``"adam"`` or ``"other"``), from the optimizer registry."""
    return optimizer_info(optimizer).family


# -- rules ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Change:
    """One field the rule looked at: old and new value and why."""

    field: str
    old: Any
    new: Any
    reason: str

    @property
    def changed(self) -> bool:
        return self.old != self.new


@dataclass(frozen=True, slots=True)
class Rescaled:
    """What :func:`rescale` returns: the new recipe and the explanation."""

    old: Recipe
    recipe: Recipe
    rule: str
    k: float
    changes: tuple[Change, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def new(self) -> Recipe:
        return self.recipe

    @property
    def reasons(self) -> list[str]:
        """One human-readable line per field the rule considered, then the notes."""
        out = [f"{c.field}: {_fmt(c.old)} -> {_fmt(c.new)} ({c.reason})" for c in self.changes]
        return out + list(self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "k": self.k, "old": self.old.to_dict(), "new": self.recipe.to_dict(),
            "reasons": self.reasons,
            "changes": [{"field": c.field, "old": c.old, "new": c.new, "reason": c.reason} for c in self.changes],
            "notes": list(self.notes),
        }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def default_rule(optimizer: str) -> str:
    """The rule used when none is given, from the optimizer registry (sgd → linear, lars → legw,
    adam/adamw → adam-sqrt, lamb/merit → sqrt). An unknown optimizer: ``ValueError`` listing the
    valid ones; one registered without a default rule: ``ValueError`` asking for a rule."""
    info = optimizer_info(optimizer)
    if info.default_rule is None:
        raise ValueError(
            f"optimizer {optimizer!r} ({info.family} family) has no default scaling rule; "
            f"pass rule= one of {', '.join(RULES)}"
        )
    return info.default_rule


def lr_factor(rule: str, k: float) -> float:
    """The LR multiplier of ``rule`` for a batch ratio ``k``."""
    check_choice("rule", rule, RULES)
    check_positive("k", k)
    return {"linear": k, "none": 1.0}.get(rule, math.sqrt(k))


def surge_lr_factor(batch_from: float, batch_to: float, b_noise: float) -> float:
    """The optimal-LR ratio ε_opt(batch_to)/ε_opt(batch_from) of Li et al. 2024 (Eq. 2).

    ε_opt(B) = ε_max / (½(√(B_noise/B) + √(B/B_noise))) for Adam-style optimizers: it grows like
    √B well below B_noise (their Eq. 4), peaks at B = B_noise (Eq. 15) and falls beyond it. The
    square-root rule's factor √(batch_to/batch_from) divided by this one is
    (B_noise + batch_to)/(B_noise + batch_from): how far sqrt scaling overshoots the curve.
    """
    for name, v in (("batch_from", batch_from), ("batch_to", batch_to), ("b_noise", b_noise)):
        check_positive(name, v)

    def eps(b: float) -> float:
        return 1.0 / (0.5 * (math.sqrt(b_noise / b) + math.sqrt(b / b_noise)))

    return eps(batch_to) / eps(batch_from)


def _surge_note(recipe: Recipe, rule: str, k: float, new_b: int, b_noise: float) -> str:
    fam = optimizer_info(recipe.optimizer).family
    if fam != "adam" or rule not in SURGE_RULES:
        return (f"b_noise {b_noise:g} given, but the surge check (Li et al. 2024) is for Adam-family optimizers "
                f"under {' or '.join(SURGE_RULES)}; not applied to optimizer {recipe.optimizer!r} ({fam} family) "
                f"with rule {rule!r}")
    if not (new_b > b_noise and new_b > recipe.batch_size):
        return (f"surge check (Li et al. 2024): batch {new_b} is not past B_noise = {b_noise:g} on the way up, "
                f"so the sqrt LR is at most x{(b_noise + new_b) / (b_noise + recipe.batch_size):.3g} above their "
                "curve; no warning")
    surge = surge_lr_factor(recipe.batch_size, new_b, b_noise)
    over = lr_factor(rule, k) / surge
    trend = "falls" if surge < 1 else "rises only"
    return (f"WARNING: batch {new_b} is past B_noise = {b_noise:g}, where the best LR of Adam-style optimizers peaks "
            f"(Li et al. 2024, 'Surge Phenomenon', Eq. 2 and 15): their curve gives lr x{surge:.3g} ({trend}), "
            f"{rule} gives x{lr_factor(rule, k):.3g}, an overshoot of x{over:.3g}; check the LR with a sweep "
            f"(B_noise must be in the batch's unit, samples)")


def _warp(x: float, w_old: float, w_new: float, total: float) -> float:
    """Piecewise-linear map of epochs taking [0, w_old] → [0, w_new] and [w_old, total] → [w_new, total]."""
    if x >= total:
        return x
    if x <= w_old:
        return x * (w_new / w_old) if w_old > 0 else x
    return w_new + (x - w_old) * (total - w_new) / (total - w_old)


def rescale(recipe: Recipe, batch_size: int, rule: str | None = None, *, b_noise: float | None = None) -> Rescaled:
    """``recipe`` moved to ``batch_size`` by ``rule`` (default: :func:`default_rule` of the optimizer).

    ``b_noise`` (samples, e.g. a study's B_crit) turns on the surge check of Li et al. 2024: a
    note, starting ``WARNING:`` when an Adam-family recipe is scaled by a square-root rule up to a
    batch past B_noise, where that rule overshoots the best LR. Without it no such check is made."""
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a bigbatch.scaling.Recipe, got {type(recipe).__name__}")
    new_b = check_int_positive("batch_size", batch_size)
    if b_noise is not None:
        check_positive("b_noise", b_noise)
    notes: list[str] = []
    if rule is None:
        rule = default_rule(recipe.optimizer)
        notes.append(f"rule {rule!r} is the default for optimizer {recipe.optimizer!r} ({RULES[rule]})")
    check_choice("rule", rule, RULES)
    k = new_b / recipe.batch_size
    src = RULES[rule]
    f = lr_factor(rule, k)
    how = {"linear": "x k", "none": "unchanged"}.get(rule, "x sqrt(k)")
    changes = [Change("batch_size", recipe.batch_size, new_b, f"k = {new_b}/{recipe.batch_size} = {k:.6g}")]
    upd: dict[str, Any] = {"batch_size": new_b, "lr": recipe.lr * f}
    changes.append(Change("lr", recipe.lr, upd["lr"], f"{how}: {src}"))
    if recipe.schedule == "power":
        upd["power_a"] = recipe.power_a * f
        changes.append(Change("power_a", recipe.power_a, upd["power_a"], f"{how}, like lr: Shen et al. 2024 take a proportional to the batch size"))

    if rule == "legw":
        w_new = recipe.warmup_epochs * k
        upd["warmup_epochs"] = w_new
        changes.append(Change("warmup_epochs", recipe.warmup_epochs, w_new, f"x k: {src}"))
        T = recipe.budget_epochs
        if T is not None and w_new > T:
            raise ValueError(
                f"legw: warmup_epochs {recipe.warmup_epochs:g} x k={k:g} = {w_new:g} is longer than budget_epochs {T:g}"
            )
        stretched = recipe.schedule in ("multistep", "exp")
        if stretched and T is None:
            notes.append(f"{recipe.schedule} decay not stretched: budget_epochs unknown")
        elif recipe.schedule == "multistep":
            ms = tuple(_warp(m, recipe.warmup_epochs, w_new, T) for m in recipe.milestones)
            upd["milestones"] = ms
            changes.append(Change("milestones", recipe.milestones, ms, "post-warmup part stretched onto [new warmup, budget] (You et al. 2019: decay stretched in epochs)"))
        elif recipe.schedule == "exp" and T > w_new and T > recipe.warmup_epochs:
            g = recipe.exp_gamma ** ((T - recipe.warmup_epochs) / (T - w_new))
            upd["exp_gamma"] = g
            changes.append(Change("exp_gamma", recipe.exp_gamma, g, "same total decay over the shorter/longer post-warmup span (You et al. 2019)"))
        elif recipe.schedule in _NEEDS_BUDGET:
            notes.append(f"{recipe.schedule} decay runs from the new warmup end to the budget: stretched automatically")
    else:
        changes.append(Change("warmup_epochs", recipe.warmup_epochs, recipe.warmup_epochs, f"same epochs: {src}"))

    if rule == "adam-sqrt":
        info = optimizer_info(recipe.optimizer)
        if info.family != "adam":
            adams = ", ".join(n for n, i in OPTIMIZERS.items() if i.family == "adam")
            raise ValueError(f"rule 'adam-sqrt' needs an Adam-family optimizer ({adams}), got {recipe.optimizer!r}")
        betas, eps = recipe.betas, recipe.eps
        dflt_b, dflt_e = info.default("betas") or (0.9, 0.999), info.default("eps") or 1e-8
        if betas is None:
            betas = tuple(dflt_b)
            notes.append(f"betas not set: {recipe.optimizer} default {tuple(dflt_b)} assumed")
        if eps is None:
            eps = dflt_e
            notes.append(f"eps not set: {recipe.optimizer} default {dflt_e:g} assumed")
        nb = []
        for i, b in enumerate(betas):
            nbi = 1.0 - (1.0 - b) * k
            if not 0.0 <= nbi < 1.0:
                raise ValueError(
                    f"adam-sqrt: beta{i + 1} = 1 - (1 - {b:g}) x k={k:g} = {nbi:g} is outside [0, 1); "
                    f"this rule allows batch_size <= {math.floor(recipe.batch_size / (1.0 - b) + 1e-9)} for beta{i + 1}={b:g}"
                )
            nb.append(nbi)
        upd["betas"] = (nb[0], nb[1])
        upd["eps"] = eps / math.sqrt(k)
        changes.append(Change("betas", recipe.betas if recipe.betas is not None else betas, upd["betas"], f"1 - beta x k: {src}"))
        changes.append(Change("eps", recipe.eps if recipe.eps is not None else eps, upd["eps"], f"/ sqrt(k): {src}"))

    if recipe.ema_decay is not None:
        upd["ema_decay"] = recipe.ema_decay**k
        changes.append(Change("ema_decay", recipe.ema_decay, upd["ema_decay"], "rho^k: Busbridge et al. 2023, EMA scaling rule"))
    changes.append(Change("weight_decay", recipe.weight_decay, recipe.weight_decay, "unchanged by every rule"))
    if b_noise is not None:
        notes.append(_surge_note(recipe, rule, k, new_b, b_noise))
    new = dataclasses.replace(recipe, **upd)
    return Rescaled(old=recipe, recipe=new, rule=rule, k=k, changes=tuple(changes), notes=tuple(notes))


class ScalingPlan:
    """A base recipe plus a rule, answering per step for whatever the current batch size is.

    Rescaled recipes are cached per batch size, and their schedules per recipe, so
    ``plan.lr_at(samples_seen, batch_size)`` costs a dict lookup and a few float operations.
    """

    def __init__(self, base: Recipe, rule: str | None = None) -> None:
        if not isinstance(base, Recipe):
            raise ValueError(f"base must be a bigbatch.scaling.Recipe, got {type(base).__name__}")
        self.base = base
        self.rule = default_rule(base.optimizer) if rule is None else check_choice("rule", rule, RULES)
        self._cache: dict[int, Rescaled] = {}

    def rescaled(self, batch_size: int) -> Rescaled:
        """The full :class:`Rescaled` (with reasons) for ``batch_size``."""
        r = self._cache.get(batch_size)
        if r is None:
            r = self._cache[batch_size] = rescale(self.base, batch_size, self.rule)
        return r

    def recipe_for(self, batch_size: int) -> Recipe:
        return self.rescaled(batch_size).recipe

    def lr_at(self, samples_seen: float, batch_size: int) -> float:
        return self.recipe_for(batch_size).lr_at(samples_seen)

    def hparams_for(self, batch_size: int) -> dict[str, Any]:
        """Optimizer hyperparameters other than ``lr`` at ``batch_size`` (momentum/betas/eps/weight_decay)."""
        d = self.recipe_for(batch_size).optimizer_hparams()
        d.pop("lr")
        return d

"""Scaling rules: move a training recipe tuned at batch ``B`` to batch ``kB`` (docs/design.md, "Units and rules").

A :class:`Recipe` is a frozen record of the hyperparameters that depend on the batch size.
:func:`rescale` returns the recipe for a new batch size together with the reason for every
change. ``k = new batch / old batch``; ``k < 1`` (going down) works too, and every rule is
invertible: ``rescale(rescale(r, kB), B) == r`` up to rounding. The rules themselves are records
in :data:`bigbatch.rules.RULES` (what each does to the LR, the warmup, Adam's betas/eps, and its
paper); ``rescale`` reads the record.

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

Two settings move more than the rule does, each printed with its reason:

* ``weight_decay_rule="timescale"`` keeps AdamW's weight-decay timescale fixed in samples
  (Wang & Aitchison 2024: τ_iter = 1/(ηλ) steps; Bergsma et al. 2025: τ = B/(ηλD) of the data):
  λ' = λ·k·η/η'. Only for decoupled decay multiplied by the LR (``OptimizerInfo.decay_form``:
  adamw; lamb and merit, whose decay the trust ratio also scales); Adam's, SGD's and LARS's L2
  decay are refused.
* ``betas_rule`` moves Adam's betas by ``"sde"`` (Malladi et al.: 1−β' = k(1−β), both betas; the
  default of ``adam-sqrt``) or ``"half-life"`` (Marek et al. 2025: β₂' = β₂^k, the half-life of
  β₂ in samples kept; β₁ unchanged). Where the two give β half-lives more than
  :data:`BETAS_DIFFER` apart, the betas' reason names the other one's values.

With ``b_noise`` given, :func:`rescale` checks the "surge" of Li et al. 2024 (*Surge Phenomenon
in Optimal Learning Rate and Batch Size Scaling*, Eq. 2): for Adam-style optimizers the best LR is
ε_max / (½(√(B_noise/B) + √(B/B_noise))), which peaks at B = B_noise (their Eq. 15) and falls
beyond it, so a square-root rule that grows the batch past B_noise overshoots; the new recipe
then carries a note saying by how much (:func:`surge_lr_factor`).

Under every rule the model-EMA decay follows the EMA scaling rule ρ → ρ^k (Busbridge et al.
2023, "How to Scale Your EMA", EMA scaling rule) — the same map as β₂'s half-life rule
(:func:`half_life_decay`) — and the Power scheduler's coefficient ``a`` scales like η (Shen et
al. 2024 make it proportional to the batch size).

:func:`seesaw_schedule` turns a recipe's LR decay into batch growth (Meterez et al. 2025, Seesaw):
a batch schedule in the form ``--batch-schedule`` reads, to run with the sqrt (or linear) rule.

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
from bigbatch.rules import RULES, SURGE_RULES, RuleInfo

__all__ = [
    "RULES", "RuleInfo", "Recipe", "Change", "Rescaled", "ScalingPlan",
    "rescale", "default_rule", "family", "lr_factor", "surge_lr_factor", "SURGE_RULES",
    "WEIGHT_DECAY_RULES", "BETAS_RULES", "BETAS_DIFFER", "half_life_decay", "sde_decay", "half_life_samples",
    "weight_decay_timescale", "Seesaw", "seesaw_schedule",
]

WEIGHT_DECAY_RULES: dict[str, str] = {
    "keep": "weight decay unchanged",
    "timescale": "Wang & Aitchison 2024 (arXiv:2405.13698) and Bergsma et al. 2025 (arXiv:2505.13738): "
                 "the AdamW timescale 1/(lr*wd) steps kept fixed in samples",
}
"""``weight_decay_rule`` → what it does (``rescale``, ``bigbatch scale --weight-decay-rule``)."""

BETAS_RULES: dict[str, str] = {
    "sde": "Malladi et al. 2022, SDE rule: 1 - beta x k for beta1 and beta2",
    "half-life": "Marek et al. 2025 (arXiv:2507.07101): beta2 -> beta2^k, its half-life in samples kept; beta1 unchanged",
}
"""``betas_rule`` → what it does (``rescale``, ``bigbatch scale --betas-rule``)."""

BETAS_DIFFER = 0.10
"""Where the SDE and half-life rules give a beta whose half-lives (in samples) differ by more than
this fraction, the betas' reason names the other rule's value."""


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
    weight_decay_rule: str = "keep"
    """What moved the weight decay: ``"keep"`` or ``"timescale"``."""
    betas_rule: str | None = None
    """What moved the betas: ``"sde"``, ``"half-life"``, or None (kept)."""

    @property
    def new(self) -> Recipe:
        return self.recipe

    def timescales(self) -> dict[str, float | None]:
        """The weight-decay timescale batch/(lr·wd) in samples, old and new (None without decay)."""
        def tau(r: Recipe) -> float | None:
            t = weight_decay_timescale(r.lr, r.weight_decay, r.batch_size)
            return None if math.isinf(t) else t
        return {"old": tau(self.old), "new": tau(self.recipe)}

    def beta_half_lives(self) -> dict[str, list[float]] | None:
        """Half-lives of β₁ and β₂ in samples, old and new (None for an optimizer without betas)."""
        info = optimizer_info(self.old.optimizer)
        if info.family != "adam":
            return None
        out = {}
        for key, r in (("old", self.old), ("new", self.recipe)):
            betas = r.betas if r.betas is not None else (info.default("betas") or OPTIMIZERS["adam"].default("betas"))
            out[key] = [half_life_samples(b, r.batch_size) for b in betas]
        return out

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
            "weight_decay_rule": self.weight_decay_rule,
            "betas_rule": self.betas_rule,
            "weight_decay_timescale_samples": self.timescales(),
            "beta_half_life_samples": self.beta_half_lives(),
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
    return RULES[rule].lr_factor(k)


def half_life_decay(rho: float, k: float) -> float:
    """``rho ** k``: an EMA decay per step moved to steps ``k`` times as large, keeping its half-life
    in samples. The EMA scaling rule (Busbridge et al. 2023) for a model EMA, and the β₂ rule of
    Marek et al. 2025 for Adam: one function for both."""
    check_positive("k", k)
    return float(rho) ** k


def sde_decay(beta: float, k: float) -> float:
    """``1 - k(1 - beta)``: Malladi et al. 2022's SDE rule for an Adam beta (first order in 1-β of
    :func:`half_life_decay`; it leaves [0, 1) once k ≥ 1/(1-β))."""
    check_positive("k", k)
    return 1.0 - k * (1.0 - float(beta))


def half_life_samples(beta: float, batch_size: float) -> float:
    """Samples after which an EMA with decay ``beta`` per step of ``batch_size`` samples has halved
    a reading: ``batch_size · ln(1/2) / ln(beta)`` (0 for beta = 0)."""
    if beta <= 0.0:
        return 0.0
    return batch_size * math.log(0.5) / math.log(beta)


def weight_decay_timescale(lr: float, weight_decay: float, batch_size: float) -> float:
    """The AdamW timescale in samples, ``batch_size / (lr · weight_decay)``: Wang & Aitchison 2024's
    τ_iter = 1/(ηλ) steps times the samples per step (Bergsma et al. 2025's τ = B/(ηλD) is this
    divided by the dataset size D). Infinite when weight_decay is 0."""
    if weight_decay == 0:
        return math.inf
    return batch_size / (lr * weight_decay)


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


def rescale(
    recipe: Recipe, batch_size: int, rule: str | None = None, *, b_noise: float | None = None,
    weight_decay_rule: str = "keep", betas_rule: str | None = None,
) -> Rescaled:
    """``recipe`` moved to ``batch_size`` by ``rule`` (default: :func:`default_rule` of the optimizer).

    ``b_noise`` (samples, e.g. a study's B_crit) turns on the surge check of Li et al. 2024: a
    note, starting ``WARNING:`` when an Adam-family recipe is scaled by a square-root rule up to a
    batch past B_noise, where that rule overshoots the best LR. Without it no such check is made.

    ``weight_decay_rule``: ``"keep"`` (default) or ``"timescale"`` (λ' = λ·k·η/η', the AdamW
    timescale kept in samples; refused for an optimizer whose decay is L2 or undeclared).
    ``betas_rule``: None (the rule's own: SDE under adam-sqrt, betas kept otherwise), ``"sde"`` or
    ``"half-life"`` (see the module docstring); an explicit one needs an Adam-family optimizer."""
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a bigbatch.scaling.Recipe, got {type(recipe).__name__}")
    new_b = check_int_positive("batch_size", batch_size)
    if b_noise is not None:
        check_positive("b_noise", b_noise)
    check_choice("weight_decay_rule", weight_decay_rule, WEIGHT_DECAY_RULES)
    if betas_rule is not None:
        check_choice("betas_rule", betas_rule, BETAS_RULES)
    notes: list[str] = []
    if rule is None:
        rule = default_rule(recipe.optimizer)
        notes.append(f"rule {rule!r} is the default for optimizer {recipe.optimizer!r} ({RULES[rule].paper})")
    check_choice("rule", rule, RULES)
    info = RULES[rule]
    opt = optimizer_info(recipe.optimizer)
    k = new_b / recipe.batch_size
    src = info.paper
    f = info.lr_factor(k)
    how = info.lr_how
    changes = [Change("batch_size", recipe.batch_size, new_b, f"k = {new_b}/{recipe.batch_size} = {k:.6g}")]
    upd: dict[str, Any] = {"batch_size": new_b, "lr": recipe.lr * f}
    changes.append(Change("lr", recipe.lr, upd["lr"], f"{how}: {src}"))
    if recipe.schedule == "power":
        upd["power_a"] = recipe.power_a * f
        changes.append(Change("power_a", recipe.power_a, upd["power_a"], f"{how}, like lr: Shen et al. 2024 take a proportional to the batch size"))

    if info.warmup == "scaled":
        _stretch_warmup(recipe, k, src, rule, upd, changes, notes)
    else:
        changes.append(Change("warmup_epochs", recipe.warmup_epochs, recipe.warmup_epochs, f"same epochs: {src}"))

    if info.adam_hparams and opt.family != "adam":
        adams = ", ".join(n for n, i in OPTIMIZERS.items() if i.family == "adam")
        raise ValueError(f"rule {rule!r} needs an Adam-family optimizer ({adams}), got {recipe.optimizer!r}")
    if betas_rule is not None and opt.family != "adam":
        raise ValueError(f"betas_rule {betas_rule!r} needs an Adam-family optimizer (one that takes betas); "
                         f"optimizer {recipe.optimizer!r} is of the {opt.family} family")
    mode = betas_rule if betas_rule is not None else ("sde" if info.adam_hparams else None)
    if mode is not None:
        betas = _filled(recipe, opt, "betas", notes)
        upd["betas"] = _move_betas(betas, k, mode, recipe.batch_size)
        reason = (f"1 - beta x k: {src if betas_rule is None else 'Malladi et al. 2022, SDE rule'}" if mode == "sde" else
                  "beta2^k (its half-life in samples kept), beta1 kept: Marek et al. 2025")
        other = "half-life" if mode == "sde" else "sde"
        alt = _compare_betas(betas, k, mode, other, recipe.batch_size)
        if alt:
            reason += f"; {alt}"
        changes.append(Change("betas", recipe.betas if recipe.betas is not None else betas, upd["betas"], reason))
    if info.adam_hparams:
        eps = _filled(recipe, opt, "eps", notes)
        upd["eps"] = eps / math.sqrt(k)
        changes.append(Change("eps", recipe.eps if recipe.eps is not None else eps, upd["eps"], f"/ sqrt(k): {src}"))

    if recipe.ema_decay is not None:
        upd["ema_decay"] = half_life_decay(recipe.ema_decay, k)
        changes.append(Change("ema_decay", recipe.ema_decay, upd["ema_decay"], "rho^k: Busbridge et al. 2023, EMA scaling rule"))
    if weight_decay_rule == "timescale":
        upd["weight_decay"] = _timescale_decay(recipe, opt, k, upd["lr"], notes)
        changes.append(Change(
            "weight_decay", recipe.weight_decay, upd["weight_decay"],
            f"x k*lr/lr' = x{k * recipe.lr / upd['lr']:.6g}: timescale batch/(lr*wd) kept at "
            f"{_fmt(weight_decay_timescale(recipe.lr, recipe.weight_decay, recipe.batch_size))} samples "
            "(Wang & Aitchison 2024; Bergsma et al. 2025)"))
    else:
        changes.append(Change("weight_decay", recipe.weight_decay, recipe.weight_decay,
                              "unchanged by every rule (weight_decay_rule 'timescale' moves it)"
                              if opt.decay_form in ("decoupled", "decoupled-trust") and recipe.weight_decay > 0
                              else "unchanged by every rule"))
    if b_noise is not None:
        notes.append(_surge_note(recipe, rule, k, new_b, b_noise))
    new = dataclasses.replace(recipe, **upd)
    if opt.decay_form in ("decoupled", "decoupled-trust") and recipe.weight_decay > 0 and recipe.dataset_size:
        notes.append(_timescale_note(recipe, new))
    return Rescaled(old=recipe, recipe=new, rule=rule, k=k, changes=tuple(changes), notes=tuple(notes),
                    weight_decay_rule=weight_decay_rule, betas_rule=mode)


def _stretch_warmup(recipe: Recipe, k: float, src: str, rule: str, upd: dict[str, Any], changes: list[Change],
                    notes: list[str]) -> None:
    """LEGW: warmup epochs × k, and a multistep/exp decay stretched onto [new warmup end, budget]."""
    w_new = recipe.warmup_epochs * k
    upd["warmup_epochs"] = w_new
    changes.append(Change("warmup_epochs", recipe.warmup_epochs, w_new, f"x k: {src}"))
    T = recipe.budget_epochs
    if T is not None and w_new > T:
        raise ValueError(
            f"{rule}: warmup_epochs {recipe.warmup_epochs:g} x k={k:g} = {w_new:g} is longer than budget_epochs {T:g}"
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


def _filled(recipe: Recipe, opt: Any, key: str, notes: list[str]) -> Any:
    """The recipe's ``betas``/``eps``, or the optimizer's registry default (said in a note). An
    optimizer registered without one falls back to torch Adam's, the ``adam`` record's default."""
    v = getattr(recipe, key)
    if v is not None:
        return tuple(v) if key == "betas" else v
    d = opt.default(key)
    whose = recipe.optimizer
    if d is None:
        d, whose = OPTIMIZERS["adam"].default(key), f"{recipe.optimizer} registers none; torch Adam's"
    d = tuple(d) if key == "betas" else d
    notes.append(f"{key} not set: {whose} default {_fmt(d) if key == 'betas' else f'{d:g}'} assumed")
    return d


def _move_betas(betas: tuple[float, float], k: float, mode: str, batch: int) -> tuple[float, float]:
    if mode == "half-life":
        return (float(betas[0]), half_life_decay(betas[1], k))
    nb = []
    for i, b in enumerate(betas):
        nbi = sde_decay(b, k)
        if not 0.0 <= nbi < 1.0:
            raise ValueError(
                f"SDE rule: beta{i + 1} = 1 - (1 - {b:g}) x k={k:g} = {nbi:g} is outside [0, 1); "
                f"this rule allows batch_size <= {math.floor(batch / (1.0 - b) + 1e-9)} for beta{i + 1}={b:g}"
                " (betas_rule 'half-life' keeps beta1 and moves beta2 to beta2^k instead)"
            )
        nb.append(nbi)
    return (nb[0], nb[1])


def _compare_betas(betas: tuple[float, float], k: float, mode: str, other: str, batch: int) -> str:
    """The other betas rule's values where a beta's half-life differs by more than BETAS_DIFFER."""
    try:
        alt = _move_betas(betas, k, other, batch)
    except ValueError:
        return f"the {other} rule cannot move these betas by k={k:g} (a beta leaves [0, 1))"
    mine = _move_betas(betas, k, mode, batch)
    new_b = batch * k
    out = []
    for i in (0, 1):
        h1, h2 = half_life_samples(mine[i], new_b), half_life_samples(alt[i], new_b)
        if max(h1, h2) > 0 and abs(h1 - h2) > BETAS_DIFFER * max(h1, h2):
            out.append(f"beta{i + 1} {_fmt(alt[i])} (half-life {_fmt(h2)} samples against {_fmt(h1)})")
    if not out:
        return ""
    return f"the {other} rule would give {', '.join(out)}, more than {BETAS_DIFFER:.0%} apart"


def _timescale_decay(recipe: Recipe, opt: Any, k: float, new_lr: float, notes: list[str]) -> float:
    """λ' = λ·k·η/η' for decoupled decay; ValueError for L2 or undeclared decay."""
    if opt.decay_form not in ("decoupled", "decoupled-trust"):
        why = ("its weight_decay is L2 (added to the gradient before the moments or the momentum buffer), "
               "which the AdamW timescale does not describe") if opt.decay_form == "l2" else \
              "its registry record does not declare how it applies weight_decay (OptimizerInfo.decay_form)"
        raise ValueError(
            f"weight_decay_rule 'timescale' needs decoupled weight decay (adamw, lamb, merit); optimizer "
            f"{recipe.optimizer!r}: {why}; use weight_decay_rule 'keep'")
    if recipe.weight_decay == 0:
        notes.append("weight_decay_rule 'timescale': weight_decay is 0, nothing to move")
    if opt.decay_form == "decoupled-trust":
        notes.append(f"{recipe.optimizer}: the decay sits inside the trust-ratio update (w <- w - lr*r*(u + wd*w)), "
                     "so its timescale is 1/(lr*r*wd) steps; the timescale rule keeps it only if the trust ratio r "
                     "is the same at both batch sizes")
    return recipe.weight_decay * k * recipe.lr / new_lr


def _timescale_note(old: Recipe, new: Recipe) -> str:
    """The weight-decay timescale in epochs, old and new, against Wang & Aitchison's guideline."""
    def epochs(r: Recipe) -> float:
        return weight_decay_timescale(r.lr, r.weight_decay, r.batch_size) / r.dataset_size
    t0, t1 = epochs(old), epochs(new)
    T = new.budget_epochs
    span = f"the run's {T:g} epochs" if T is not None else "the run's length"
    out = (f"weight-decay timescale batch/(lr*wd): {t0:.3g} -> {t1:.3g} epochs (Wang & Aitchison 2024: between about "
           f"1 epoch and {span}; weight_decay_rule 'timescale' keeps it fixed)")
    if t1 < 1.0 or (T is not None and t1 > T):
        out = f"{out}: the new {t1:.3g} epochs is outside that range"
    return out


class ScalingPlan:
    """A base recipe plus a rule, answering per step for whatever the current batch size is.

    Rescaled recipes are cached per batch size, and their schedules per recipe, so
    ``plan.lr_at(samples_seen, batch_size)`` costs a dict lookup and a few float operations.
    """

    def __init__(self, base: Recipe, rule: str | None = None, *, weight_decay_rule: str = "keep",
                 betas_rule: str | None = None) -> None:
        if not isinstance(base, Recipe):
            raise ValueError(f"base must be a bigbatch.scaling.Recipe, got {type(base).__name__}")
        self.base = base
        self.rule = default_rule(base.optimizer) if rule is None else check_choice("rule", rule, RULES)
        self.weight_decay_rule = check_choice("weight_decay_rule", weight_decay_rule, WEIGHT_DECAY_RULES)
        self.betas_rule = None if betas_rule is None else check_choice("betas_rule", betas_rule, BETAS_RULES)
        self._cache: dict[int, Rescaled] = {}

    def rescaled(self, batch_size: int) -> Rescaled:
        """The full :class:`Rescaled` (with reasons) for ``batch_size``."""
        r = self._cache.get(batch_size)
        if r is None:
            r = self._cache[batch_size] = rescale(self.base, batch_size, self.rule, weight_decay_rule=self.weight_decay_rule,
                                                  betas_rule=self.betas_rule)
        return r

    def recipe_for(self, batch_size: int) -> Recipe:
        return self.rescaled(batch_size).recipe

    def lr_at(self, samples_seen: float, batch_size: int) -> float:
        return self.recipe_for(batch_size).lr_at(samples_seen)

    def hparams_for(self, batch_size: int) -> dict[str, Any]:
        """Optimizer hyperparameters other than ``lr`` at ``batch_size`` (momentum/betas/eps/weight_decay).

        The reference trainer sets momentum/betas/eps from here when the batch changes, never
        weight_decay (and it builds its plan with weight_decay_rule ``keep``): a library loop that
        uses ``weight_decay_rule="timescale"`` sets ``weight_decay`` itself."""
        d = self.recipe_for(batch_size).optimizer_hparams()
        d.pop("lr")
        return d


# -- Seesaw: LR decay turned into batch growth ------------------------------------------------
_SEESAW_GRID = 4096


@dataclass(frozen=True, slots=True)
class Seesaw:
    """A batch schedule that replaces a recipe's LR decay by batch growth (:func:`seesaw_schedule`).

    Train it with the recipe's LR schedule unchanged, ``--batch-schedule`` = :meth:`text`, and
    ``rule`` from the recipe's batch: the LR the trainer then uses is
    ``schedule(n) · rule_factor(batch(n) / recipe.batch_size)`` (:meth:`lr_at`)."""

    recipe: Recipe
    """The recipe whose decay was cut (its ``batch_size`` is the schedule's first batch)."""
    rule: str
    """The rule to train it with: ``sqrt`` (Seesaw, Adam) or ``linear`` (Smith et al. 2017, SGD)."""
    schedule: tuple[tuple[int, int], ...]
    """``(samples, batch)`` thresholds, the first at 0 (``bigbatch.adaptive.parse_batch_schedule``'s form)."""
    cuts: tuple[float, ...]
    """The base LR's fraction of its peak that each threshold stands for (1, 1/2, 1/4, … for halvings)."""
    notes: tuple[str, ...] = ()

    def batch_at(self, samples: float) -> int:
        """The schedule's batch after ``samples`` samples."""
        b = self.schedule[0][1]
        for s, nb in self.schedule:
            if samples >= s:
                b = nb
        return b

    def lr_at(self, samples: float) -> float:
        """The LR a trainer following the schedule under ``rule`` uses after ``samples`` samples."""
        k = self.batch_at(samples) / self.recipe.batch_size
        return self.recipe.lr_at(samples) * RULES[self.rule].lr_factor(k)

    def text(self) -> str:
        """The schedule as a ``--batch-schedule`` file: ``#`` lines saying where it came from, then
        ``samples:batch`` entries."""
        head = [f"# Seesaw (Meterez et al. 2025, arXiv:2510.14717): the {self.recipe.schedule} decay of a recipe at batch "
                f"{self.recipe.batch_size}, lr {self.recipe.lr:g}, turned into batch growth where its LR drops; train with --rule {self.rule} "
                f"--base-batch-size {self.recipe.batch_size} and the recipe's LR schedule unchanged"]
        head += [f"# {n}" for n in self.notes]
        return "\n".join(head) + "\n" + ",".join(f"{s}:{b}" for s, b in self.schedule) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "schedule": [list(p) for p in self.schedule], "cuts": list(self.cuts),
                "notes": list(self.notes)}


def _first_at_or_below(f: Any, level: float, lo: int, hi: int) -> int:
    """Smallest integer n in (lo, hi] with f(n) <= level, given f(lo) > level >= f(hi), f non-increasing."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) <= level:
            hi = mid
        else:
            lo = mid
    return hi


def seesaw_schedule(recipe: Recipe, *, rule: str | None = None, b_crit: float | None = None,
                    max_batch: int | None = None) -> Seesaw:
    """The Seesaw batch schedule of ``recipe`` (Meterez et al. 2025, "Seesaw", arXiv:2510.14717).

    Seesaw: wherever a step-decay schedule would cut the LR by α, cut it by √α and multiply the
    batch by α instead (for α = 2: LR × 1/√2, batch × 2). bigbatch's LR is the recipe's schedule in
    samples times the rule's factor for the current batch, so under the ``sqrt`` rule this is the
    recipe's schedule left as it is and the batch multiplied by α where the schedule drops by α
    (½ · √2 = 1/√2); under ``linear`` it is Smith et al. 2017's "don't decay the learning rate,
    increase the batch size" (½ · 2 = 1).

    Where the thresholds go: a ``multistep`` decay drops by 1/γ at each milestone, and the batch
    grows by 1/γ there (rounded to an integer batch; a note says where rounding moved it). A
    continuous decay (cosine, poly, wsd, exp, power) is cut into halvings: the j-th threshold is the
    first sample at which the schedule's LR is at or below peak·2^-j (peak: its value at the end of
    warmup), and the batch doubles there; between thresholds the base LR keeps decaying. The cuts
    stop where the next batch would exceed ``max_batch``, where fewer samples than one step of the
    new batch remain before the budget, or where the LR no longer halves (a floor min_lr_ratio).

    ``rule``: ``sqrt`` (default for Adam-family optimizers; the Seesaw rule) or ``linear`` (default
    otherwise). ``b_crit`` (samples, e.g. a study's B_crit): a ``WARNING:`` note where the batch
    passes it, since Seesaw's equivalence holds only below the critical batch size.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a bigbatch.scaling.Recipe, got {type(recipe).__name__}")
    if rule is None:
        rule = "sqrt" if optimizer_info(recipe.optimizer).family == "adam" else "linear"
    check_choice("rule", rule, RULES)
    seesaw_rules = [n for n, r in RULES.items() if r.lr_only and r.lr_power > 0]
    if rule not in seesaw_rules:
        raise ValueError(f"seesaw rule must be one of {', '.join(seesaw_rules)} (the rules that move only the LR, and grow "
                         f"it with the batch: Seesaw trades LR decay for batch growth alone), got {rule!r}")
    if b_crit is not None:
        check_positive("b_crit", b_crit)
    if max_batch is not None:
        check_int_positive("max_batch", max_batch)
    if recipe.dataset_size is None:
        raise ValueError("seesaw needs dataset_size (the recipe's epochs placed in samples, where the batch changes)")
    if recipe.schedule == "constant":
        raise ValueError("seesaw needs an LR decay to turn into batch growth; schedule 'constant' has none")
    T = recipe.budget_samples
    if T is None and max_batch is None:
        raise ValueError(f"seesaw: schedule {recipe.schedule!r} without budget_epochs decays forever; give max_batch")
    sched = recipe.to_schedule()
    W = int(math.ceil(recipe.warmup_samples or 0.0))
    b0 = recipe.batch_size
    pairs: list[tuple[int, int]] = [(0, b0)]
    cuts: list[float] = [1.0]
    notes: list[str] = []
    end = T if T is not None else None

    def room(n: int, b: int) -> bool:
        return (end is None or end - n >= b) and (max_batch is None or b <= max_batch)

    if recipe.schedule == "multistep":
        g = recipe.gamma
        if g >= 1.0:
            raise ValueError(f"seesaw needs a decaying multistep schedule (gamma < 1), got gamma {g:g}")
        for i, m in enumerate(sched.milestones, start=1):
            exact = b0 * (1.0 / g) ** i
            b = max(int(round(exact)), pairs[-1][1])
            n = int(math.ceil(m))
            if not room(n, b):
                break
            if abs(b - exact) > 1e-9 * exact:
                notes.append(f"milestone {i}: batch {exact:g} rounded to {b}")
            pairs.append((n, b))
            cuts.append(g**i)
    else:
        peak = sched(W)
        hi_n = int(end) if end is not None else None
        if hi_n is None:  # no budget: search until the batch cap is reached (bounded below)
            hi_n = W + 1
            while sched(hi_n) > peak * 2.0 ** -(math.floor(math.log2(max_batch / b0)) + 1) and hi_n < 1 << 62:
                hi_n *= 2
        grid = [W + (hi_n - W) * i // _SEESAW_GRID for i in range(_SEESAW_GRID + 1)]
        vals = [sched(x) for x in grid]
        j, gi = 1, 0
        while True:
            level = peak * 2.0**-j
            while gi < len(grid) and vals[gi] > level:
                gi += 1
            if gi >= len(grid):
                if j == 1:
                    raise ValueError(f"seesaw: the {recipe.schedule} schedule never falls to half its peak within "
                                     "the budget (min_lr_ratio >= 0.5?); nothing to cut")
                notes.append(f"the LR does not halve again before the budget (floor {vals[-1] / peak:.3g} of the peak)")
                break
            n = grid[gi] if gi == 0 else _first_at_or_below(sched, level, grid[gi - 1], grid[gi])
            b = b0 * 2**j
            if n <= pairs[-1][0] or not room(n, b):
                break
            pairs.append((n, b))
            cuts.append(2.0**-j)
            j += 1
        notes.append(f"{recipe.schedule} decay cut into halvings: batch x2 at the first sample where the LR is at or "
                     "below peak/2, peak/4, ...; between them the base LR keeps decaying")
    if len(pairs) == 1:
        raise ValueError("seesaw: no batch increase fits (the first cut would exceed max_batch or the budget)")
    if b_crit is None and max_batch is None:
        notes.append("no B_crit and no max_batch given: the batch grows as long as the decay does; Seesaw holds only "
                     "below the critical batch size (measure it with bigbatch study)")
    if b_crit is not None:
        for n, b in pairs:
            if b > b_crit:
                notes.append(f"WARNING: from sample {n} the batch {b} is past the measured B_crit = {b_crit:g}; Seesaw's "
                             "equivalence of LR decay and batch growth holds below the critical batch size (Meterez et "
                             "al. 2025), beyond it the larger batch no longer saves steps: cap it with max_batch")
                break
    grow = 1.0 / recipe.gamma if recipe.schedule == "multistep" else 2.0
    where = "milestone" if recipe.schedule == "multistep" else "halving"
    how = (f"LR x {RULES[rule].lr_factor(grow) / grow:.3g} and batch x {grow:g} per {where}"
           + {1.0: " (Smith et al. 2017: LR held)", 0.5: " (Seesaw: LR x 1/sqrt(decay factor))"}.get(RULES[rule].lr_power, ""))
    notes.insert(0, f"rule {rule}: {how}")
    return Seesaw(recipe=recipe, rule=rule, schedule=tuple(pairs), cuts=tuple(cuts), notes=tuple(notes))

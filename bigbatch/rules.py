"""The registry of batch-size scaling rules: one record per rule, read by every module that names one.

A rule moves a recipe tuned at batch ``B`` to batch ``kB``. Each :class:`RuleInfo` says what the
rule does to the learning rate (a power of ``k``), to the warmup, and to Adam's betas and epsilon,
whether it changes only the LR (so it can be applied to a running optimizer), and the paper it
comes from. :func:`bigbatch.scaling.rescale` reads the record instead of branching on the rule's
name; the optimizer registry (a default rule per optimizer), the study's configuration, the CLI and
the framework integrations (:data:`LR_ONLY_RULES`) read the same :data:`RULES`.

This module is a leaf: it imports only the standard library, so anything may import it.

Adding a rule is one record here; :func:`~bigbatch.scaling.rescale` then applies it. A rule whose
behaviour is not one of the fields below (an LR power, warmup kept or stretched ×k, Adam's
hyperparameters moved by the SDE rule) needs its case in ``rescale`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = ["RuleInfo", "RULES", "LR_ONLY_RULES", "SURGE_RULES", "rule_names"]

_WARMUPS = ("same", "scaled")


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """One scaling rule: what it does to each batch-size-dependent hyperparameter, and its source."""

    name: str
    """The rule's name (``--rule``, ``Recipe``-level ``rule=``)."""
    paper: str
    """Where the rule comes from (printed beside every change it makes)."""
    lr_power: float
    """The LR moves by ``k ** lr_power``: 1 linear, 0.5 square root, 0 unchanged."""
    warmup: str = "same"
    """``"same"``: warmup kept in epochs; ``"scaled"``: warmup epochs × k and the decay stretched
    onto the new warmup end (LEGW)."""
    adam_hparams: bool = False
    """True: 1−β₁ and 1−β₂ × k and ε ÷ √k (Malladi et al.'s SDE rule); needs an Adam-family optimizer."""
    surge: bool = False
    """True: a square-root rule whose LR the surge check (Li et al. 2024) compares with the best LR."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"rule name must be a non-empty string, got {self.name!r}")
        if self.warmup not in _WARMUPS:
            raise ValueError(f"rule {self.name!r}: warmup must be one of {', '.join(_WARMUPS)}, got {self.warmup!r}")
        if not (isinstance(self.lr_power, (int, float)) and math.isfinite(self.lr_power) and self.lr_power >= 0):
            raise ValueError(f"rule {self.name!r}: lr_power must be a number >= 0, got {self.lr_power!r}")

    @property
    def lr_only(self) -> bool:
        """True when the rule changes only the LR (no warmup stretch, no betas/eps): it can then be
        applied to a running optimizer when the batch changes mid-run."""
        return self.warmup == "same" and not self.adam_hparams

    def lr_factor(self, k: float) -> float:
        """The LR multiplier for a batch ratio ``k`` (``k ** lr_power``; ``math.sqrt`` for ½)."""
        if self.lr_power == 0:
            return 1.0
        if self.lr_power == 1:
            return float(k)
        if self.lr_power == 0.5:
            return math.sqrt(k)
        return float(k) ** self.lr_power

    @property
    def lr_how(self) -> str:
        """The LR change in words (``x k``, ``x sqrt(k)``, ``unchanged``, ``x k^p``)."""
        return {0: "unchanged", 1: "x k", 0.5: "x sqrt(k)"}.get(self.lr_power, f"x k^{self.lr_power:g}")


_RULES: dict[str, RuleInfo] = {}


def _add(info: RuleInfo) -> None:
    _RULES[info.name] = info


_add(RuleInfo("linear", "Goyal et al. 2017, linear scaling rule (§2.1)", 1.0))
_add(RuleInfo("sqrt", "Krizhevsky 2014, square-root scaling ('One weird trick')", 0.5, surge=True))
_add(RuleInfo("legw", "You et al. 2019, LEGW: sqrt LR scaling with linear-epoch gradual warmup", 0.5, warmup="scaled"))
_add(RuleInfo("adam-sqrt", "Malladi et al. 2022, SDE square-root scaling rule for Adam", 0.5, adam_hparams=True,
              surge=True))
_add(RuleInfo("none", "no scaling", 0.0))

RULES: Mapping[str, RuleInfo] = MappingProxyType(_RULES)
"""Rule name → :class:`RuleInfo` (read-only; ``sorted(RULES)`` and ``name in RULES`` work as on names)."""

LR_ONLY_RULES: tuple[str, ...] = tuple(n for n, r in RULES.items() if r.lr_only)
"""Rules that change only the LR (linear, sqrt, none): the ones a running optimizer can follow."""

SURGE_RULES: tuple[str, ...] = tuple(n for n, r in RULES.items() if r.surge)
"""The square-root rules whose LR the surge check compares with Li et al. 2024's curve."""


def rule_names() -> tuple[str, ...]:
    """The rule names, in registry order (linear, sqrt, legw, adam-sqrt, none)."""
    return tuple(RULES)

"""The :class:`Recipe`: the batch-size-dependent part of a training recipe (docs/design.md, "Units and rules").

Lengths are in epochs of ``dataset_size`` samples, so the LR schedule it describes is a
function of samples seen and does not depend on the batch size. Fields can be read from
TOML (``tomllib``) and written back; :mod:`bigbatch.scaling` moves a recipe to another
batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigbatch._checks import (
    check_choice, check_in_range, check_int_positive, check_nonnegative, check_positive, closest,
)
from bigbatch.optim.factory import optimizer_info
from bigbatch.schedules import DECAYS, SHAPE_FIELDS, Schedule, ScheduleShape

__all__ = ["Recipe"]

_NEEDS_BUDGET = ("poly", "cosine", "wsd")


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe(ScheduleShape):
    """The batch-size-dependent part of a training recipe; lengths in epochs.

    The schedule's shape fields (warmup, warmup_start_factor, poly_power, exp_gamma, gamma,
    min_lr_ratio, decay_fraction, wsd_decay_shape, power_a, power_b) are
    :class:`bigbatch.schedules.ScheduleShape`'s, shared with :class:`~bigbatch.schedules.Schedule`."""

    batch_size: int
    """Global batch size (examples per optimizer step) at which the recipe is tuned."""
    lr: float
    """Peak learning rate η."""
    optimizer: str = "sgd"
    """Optimizer name: one of ``bigbatch.optim.optimizer_names()`` (sgd, adam, adamw, lars, lamb,
    merit, and any registered one) or a ``module:Class`` spec; checked at construction."""
    momentum: float | None = None
    """Heavy-ball momentum (sgd, lars); None: the optimizer's default."""
    betas: tuple[float, float] | None = None
    """Adam-family (β₁, β₂), each in [0, 1); None: the optimizer's default."""
    eps: float | None = None
    """Adam-family ε (or an optimizer's own ``eps``, such as LARS's); None: the optimizer's default."""
    weight_decay: float = 0.0
    """Weight decay (kept by every rule)."""
    dataset_size: int | None = None
    """Samples per epoch; needed to place the epoch lengths in samples."""
    warmup_epochs: float = 0.0
    """Warmup length in epochs."""
    budget_epochs: float | None = None
    """Training length in epochs (needed by poly, cosine, wsd)."""
    schedule: str = "constant"
    """Decay shape after warmup: constant, poly, exp, multistep, cosine, wsd, power."""
    milestones: tuple[float, ...] = ()
    """``multistep`` milestones in epochs (increasing)."""
    ema_decay: float | None = None
    """Per-step decay ρ of a model EMA, in [0, 1); None: no EMA."""

    def __post_init__(self) -> None:
        check_int_positive("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise ValueError(f"optimizer must be a non-empty name, got {self.optimizer!r}")
        if self.momentum is not None:
            check_in_range("momentum", self.momentum, 0.0, 1.0)
        if self.betas is not None:
            b = tuple(self.betas)
            if len(b) != 2:
                raise ValueError(f"betas must be two numbers (beta1, beta2), got {self.betas!r}")
            for name, v in zip(("betas[0] (beta1)", "betas[1] (beta2)"), b):
                check_in_range(name, v, 0.0, 1.0)
            object.__setattr__(self, "betas", (float(b[0]), float(b[1])))
        if self.eps is not None:
            check_positive("eps", self.eps)
        # After the range checks: a value out of range is reported as such whatever the optimizer.
        info = optimizer_info(self.optimizer)  # unknown name: the error lists the valid ones
        for key in ("momentum", "betas", "eps"):
            # A key the family does not scale may still be the optimizer's own (LARS's eps).
            if getattr(self, key) is not None and not info.takes(key) and key not in info.defaults:
                takes = ", ".join(info.hparams) or "neither momentum nor betas/eps"
                raise ValueError(
                    f"{key} is not a hyperparameter of optimizer {self.optimizer!r} "
                    f"({info.family} family, takes {takes}); leave it unset"
                )
        check_nonnegative("weight_decay", self.weight_decay)
        if self.dataset_size is not None:
            check_int_positive("dataset_size", self.dataset_size)
        check_nonnegative("warmup_epochs", self.warmup_epochs)
        check_choice("schedule", self.schedule, DECAYS)
        self._check_shape()
        if self.budget_epochs is not None:
            check_positive("budget_epochs", self.budget_epochs)
            if self.warmup_epochs > self.budget_epochs:
                raise ValueError(
                    f"warmup_epochs must be <= budget_epochs ({self.budget_epochs:g}), got {self.warmup_epochs:g}"
                )
        elif self.schedule in _NEEDS_BUDGET:
            raise ValueError(f"budget_epochs must be set (> 0) for schedule {self.schedule!r}")
        if self.ema_decay is not None:
            check_in_range("ema_decay", self.ema_decay, 0.0, 1.0)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        # The lengths (milestones against the budget, ...) are validated by Schedule, in samples.
        self._schedule(1.0)

    # -- schedule ------------------------------------------------------------------------
    def _schedule(self, epoch_samples: float) -> Schedule:
        e = float(epoch_samples)
        return Schedule(
            peak_lr=self.lr, decay=self.schedule, warmup_samples=self.warmup_epochs * e,
            total_samples=None if self.budget_epochs is None else self.budget_epochs * e, epoch_samples=e,
            milestones=tuple(m * e for m in self.milestones), **self.shape(),
        )

    def to_schedule(self) -> Schedule:
        """The LR schedule in samples (needs ``dataset_size``)."""
        if self.dataset_size is None:
            raise ValueError("dataset_size must be set (> 0) to turn the recipe's epochs into samples")
        return self._schedule(self.dataset_size)

    def lr_at(self, samples_seen: float) -> float:
        """Learning rate after ``samples_seen`` samples (cached schedule: cheap per step)."""
        return _cached_schedule(self)(samples_seen)

    def lr_at_epoch(self, epoch: float) -> float:
        """Learning rate at ``epoch`` epochs (does not need ``dataset_size``)."""
        return _cached_epoch_schedule(self)(epoch)

    @property
    def warmup_samples(self) -> float | None:
        return None if self.dataset_size is None else self.warmup_epochs * self.dataset_size

    @property
    def budget_samples(self) -> float | None:
        if self.dataset_size is None or self.budget_epochs is None:
            return None
        return self.budget_epochs * self.dataset_size

    def optimizer_hparams(self) -> dict[str, Any]:
        """``lr`` and the optimizer hyperparameters that are set, as param-group keys."""
        d: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        for k in ("momentum", "betas", "eps"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    # -- construction / IO ---------------------------------------------------------------
    @classmethod
    def from_samples(
        cls, *, dataset_size: int, warmup_samples: float = 0.0, budget_samples: float | None = None,
        milestones_samples: tuple[float, ...] = (), **fields_: Any,
    ) -> "Recipe":
        """A recipe whose lengths are given in samples (converted to epochs of ``dataset_size``)."""
        n = check_int_positive("dataset_size", dataset_size)
        return cls(
            dataset_size=n, warmup_epochs=check_nonnegative("warmup_samples", warmup_samples) / n,
            budget_epochs=None if budget_samples is None else check_positive("budget_samples", budget_samples) / n,
            milestones=tuple(float(m) / n for m in milestones_samples), **fields_,
        )

    def to_dict(self) -> dict[str, Any]:
        # Own fields first (batch_size, lr, optimizer, ...), then the schedule's shape fields.
        own = [f.name for f in dataclasses.fields(self) if f.name not in SHAPE_FIELDS]
        d = {k: getattr(self, k) for k in (*own, *SHAPE_FIELDS)}
        d["betas"] = None if self.betas is None else list(self.betas)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                near = closest(key, names)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise ValueError(f"unknown recipe field {key!r}{hint}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a TOML file: top-level keys, or a ``[recipe]`` table."""
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(data.get("recipe", data) if isinstance(data.get("recipe"), dict) else data)

    def to_toml(self) -> str:
        lines = []
        for k, v in self.to_dict().items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


@functools.lru_cache(maxsize=256)
def _cached_schedule(recipe: Recipe) -> Schedule:
    return recipe.to_schedule()


@functools.lru_cache(maxsize=256)
def _cached_epoch_schedule(recipe: Recipe) -> Schedule:
    return recipe._schedule(1.0)

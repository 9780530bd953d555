"""Learning-rate schedules as pure functions of *samples seen* (docs/design.md, "Units and rules").

A schedule is a warmup followed by a decay shape. Time is measured in samples (or tokens,
or epochs × dataset size), never in optimizer steps, so the same schedule gives the same
LR at the same point of training whatever the batch size is, and stays right when the
batch size changes during a run (adaptive batch sizes, gradient accumulation changes).

Warmup (length ``W`` samples) ramps from ``warmup_start_factor × target`` to ``target``,
where ``target = decay(W)`` is the post-warmup curve at the boundary, so every warmup is
continuous there (for the Power scheduler the target is ``min(lr, a·W^b)``, as in Shen et
al. 2024, eq. 4):

* ``linear``: Goyal et al. 2017, §2.2 ("gradual warmup").
* ``exponential``: a geometric ramp ``target · s^(1 - n/W)`` from ``s = warmup_start_factor``.
* ``none``: no warmup.

Decay shapes, ``n`` samples seen, ``T`` the total (budget) samples, ``η`` the peak LR,
``η_min = min_lr_ratio · η``:

* ``constant``: ``η``.
* ``poly``: ``η_min + (η - η_min)(1 - (n-W)/(T-W))^p`` (You et al. 2019, LEGW).
* ``exp``: ``η · γ^((n-W)/epoch)``, ``γ = exp_gamma`` per epoch.
* ``multistep``: ``η · γ^(number of milestones ≤ n)``, milestones in samples (Goyal et al. 2017, §5.1: ×0.1 at epochs 30, 60, 80).
* ``cosine``: ``η_min + (η - η_min)(1 + cos(π (n-W)/(T-W)))/2`` (Loshchilov & Hutter 2017, eq. 5, one cycle).
* ``wsd``: warmup-stable-decay (Hu et al. 2024, MiniCPM): ``η`` until ``T(1 - f)``, then a
  ``linear``, ``cosine`` or ``sqrt`` (``1 - sqrt(t)``, Hägele et al. 2024) decay to ``η_min`` at ``T``.
* ``power``: ``min(η, a · n^b)`` (Shen et al. 2024, eq. 3; their batch factor β is folded
  into ``a`` here, so a scaling rule scales ``a`` as it scales ``η``); when ``T`` is known it
  ends with the same final decay as ``wsd`` over the last ``decay_fraction`` of the run.

``SampleLR`` plugs any schedule into a PyTorch optimizer as an ``LRScheduler`` advanced by
samples (timm's habit of taking the counter from the caller).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from bigbatch._checks import check_choice, check_in_range, check_nonnegative, check_positive

__all__ = ["WARMUPS", "DECAYS", "WSD_DECAY_SHAPES", "ScheduleShape", "Schedule", "SampleLR"]

WARMUPS = ("linear", "exponential", "none")
DECAYS = ("constant", "poly", "exp", "multistep", "cosine", "wsd", "power")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")

_NEEDS_TOTAL = ("poly", "cosine", "wsd")
_DEFAULT_EXP_WARMUP_START = 0.01  # a geometric ramp cannot start at 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleShape:
    """The unit-free shape of a warmup + decay schedule, shared by :class:`Schedule` (lengths in
    samples) and :class:`bigbatch.scaling.Recipe` (lengths in epochs): each field is declared,
    documented and range-checked here once."""

    warmup: str = "linear"
    """Warmup shape: linear, exponential or none."""
    warmup_start_factor: float | None = None
    """LR at the start of warmup as a fraction of the warmup target; None: 0 (linear), 0.01
    (exponential). Goyal et al. 2017 (§2.2) start at the small-batch LR, i.e. 1/k under the
    linear rule."""
    poly_power: float = 1.0
    """Power p of the ``poly`` decay."""
    exp_gamma: float = 0.97
    """LR factor per epoch of the ``exp`` decay."""
    gamma: float = 0.1
    """``multistep``: factor applied at each milestone."""
    min_lr_ratio: float = 0.0
    """Floor of poly, cosine, wsd and power's final decay, as a fraction of the peak LR."""
    decay_fraction: float = 0.1
    """``wsd`` / ``power``: fraction of the run spent in the final decay."""
    wsd_decay_shape: str = "linear"
    """Shape of the final decay of ``wsd`` / ``power``: linear, cosine or sqrt (1 - sqrt)."""
    power_a: float = 4.0
    """``power``: coefficient a of ``min(lr, a · n^b)``, n in samples (Shen et al. 2024 use a = 4
    times the batch size)."""
    power_b: float = -0.51
    """``power``: exponent b of ``a · n^b`` (Shen et al. 2024: -0.51)."""

    def _check_shape(self) -> None:
        """Range checks of the shape fields (called by the subclasses' ``__post_init__``)."""
        check_choice("warmup shape", self.warmup, WARMUPS)
        check_choice("wsd_decay_shape", self.wsd_decay_shape, WSD_DECAY_SHAPES)
        if self.warmup_start_factor is not None:
            lo_open = self.warmup == "exponential"
            check_in_range("warmup_start_factor", self.warmup_start_factor, 0.0, 1.0, lo_inclusive=not lo_open, hi_inclusive=True)
        check_positive("poly_power", self.poly_power)
        check_in_range("exp_gamma", self.exp_gamma, 0.0, 1.0, lo_inclusive=False, hi_inclusive=True)
        check_in_range("gamma", self.gamma, 0.0, 1.0, lo_inclusive=False, hi_inclusive=True)
        check_in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, hi_inclusive=True)
        check_in_range("decay_fraction", self.decay_fraction, 0.0, 1.0, hi_inclusive=True)
        check_positive("power_a", self.power_a)
        check_in_range("power_b", self.power_b, -math.inf, 0.0, lo_inclusive=False)

    def shape(self) -> dict[str, Any]:
        """The shape fields as keyword arguments (for building a :class:`Schedule` from a recipe)."""
        return {f.name: getattr(self, f.name) for f in fields(ScheduleShape)}


SHAPE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ScheduleShape))


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule(ScheduleShape):
    """Warmup then decay; call it with the samples seen to get the learning rate.

    Lengths are in samples; the shape fields (warmup, poly_power, ...) are
    :class:`ScheduleShape`'s."""

    peak_lr: float
    """Peak learning rate η (after warmup)."""
    decay: str = "constant"
    """Shape after warmup: constant, poly, exp, multistep, cosine, wsd, power."""
    warmup_samples: float = 0.0
    """Warmup length in samples (0: no warmup)."""
    total_samples: float | None = None
    """Length of the run in samples; needed by poly, cosine and wsd (and power's final decay)."""
    epoch_samples: float | None = None
    """Samples per epoch; needed by ``exp`` (its γ is per epoch)."""
    milestones: tuple[float, ...] = ()
    """``multistep``: samples at which the LR is multiplied by ``gamma`` (increasing)."""

    def __post_init__(self) -> None:
        check_positive("peak_lr", self.peak_lr)
        check_choice("decay shape", self.decay, DECAYS)
        self._check_shape()
        check_nonnegative("warmup_samples", self.warmup_samples)
        if self.total_samples is not None:
            check_positive("total_samples", self.total_samples)
            if self.warmup_samples > self.total_samples:
                raise ValueError(
                    f"warmup_samples must be <= total_samples ({self.total_samples:g}), got {self.warmup_samples:g}"
                )
        elif self.decay in _NEEDS_TOTAL:
            raise ValueError(f"total_samples must be set (> 0) for the {self.decay!r} decay")
        if self.epoch_samples is not None:
            check_positive("epoch_samples", self.epoch_samples)
        elif self.decay == "exp":
            raise ValueError("epoch_samples must be set (> 0) for the 'exp' decay (its gamma is per epoch)")
        ms = tuple(float(check_nonnegative("milestones", m)) for m in self.milestones)
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(self.milestones)}")
        object.__setattr__(self, "milestones", ms)

    # -- the math ------------------------------------------------------------------------
    def __call__(self, samples: float) -> float:
        """Learning rate after ``samples`` samples (a finite number >= 0)."""
        n = check_nonnegative("samples", samples)
        W = self.warmup_samples
        if self.warmup != "none" and n < W:
            target = self._decayed(W)
            s = self._start_factor()
            u = n / W
            if self.warmup == "linear":
                return target * (s + (1.0 - s) * u)
            return target * s ** (1.0 - u)
        return self._decayed(n)

    lr_at = __call__

    def _start_factor(self) -> float:
        if self.warmup_start_factor is not None:
            return float(self.warmup_start_factor)
        return _DEFAULT_EXP_WARMUP_START if self.warmup == "exponential" else 0.0

    def _decayed(self, n: float) -> float:
        """The post-warmup curve, continued to n (also used for the warmup target at n = W)."""
        eta, W, shape = float(self.peak_lr), self.warmup_samples, self.decay
        floor = self.min_lr_ratio * eta
        if shape == "constant":
            return eta
        if shape == "exp":
            return eta * self.exp_gamma ** (max(0.0, n - W) / self.epoch_samples)
        if shape == "multistep":
            return eta * self.gamma ** bisect.bisect_right(self.milestones, n)
        if shape == "power":
            lr = eta if n <= 0 else min(eta, self.power_a * n**self.power_b)
            if self.total_samples is not None and self.decay_fraction > 0:
                return self._final_decay(n, lr)
            return lr
        T = float(self.total_samples)
        t = 1.0 if T <= W else min(1.0, max(0.0, (n - W) / (T - W)))
        if shape == "poly":
            return floor + (eta - floor) * (1.0 - t) ** self.poly_power
        if shape == "cosine":
            return floor + (eta - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self._final_decay(n, eta)  # wsd

    def _final_decay(self, n: float, lr: float) -> float:
        """WSD's last phase: from the stable value to the floor over the last decay_fraction of T."""
        T = float(self.total_samples)
        start = max(self.warmup_samples, T * (1.0 - self.decay_fraction))
        if n <= start or T <= start:
            return lr
        if self.decay == "power":
            lr = self.peak_lr if start <= 0 else min(self.peak_lr, self.power_a * start**self.power_b)
        floor = self.min_lr_ratio * self.peak_lr
        t = min(1.0, (n - start) / (T - start))
        if self.wsd_decay_shape == "linear":
            g = 1.0 - t
        elif self.wsd_decay_shape == "cosine":
            g = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            g = 1.0 - math.sqrt(t)
        return floor + (lr - floor) * g if lr > floor else lr

    def to_dict(self) -> dict[str, Any]:
        # Own fields first (peak_lr, decay, lengths), then the shape: the order a reader expects.
        own = [f.name for f in fields(self) if f.name not in SHAPE_FIELDS]
        return {k: getattr(self, k) for k in (*own, *SHAPE_FIELDS)}


class SampleLR(torch.optim.lr_scheduler.LRScheduler):
    """``LRScheduler`` that sets each param group's LR from a :class:`Schedule` of samples.

    Each group keeps its own base LR (its ``initial_lr``): its LR at ``n`` samples is
    ``initial_lr × schedule(n) / schedule.peak_lr``, so groups with different base LRs keep
    their ratio. Advance it after ``optimizer.step()`` with ``step(samples=n)`` — ``n`` the
    total samples seen so far, which makes the schedule immune to changing batch sizes and to
    wrappers that call ``step()`` once per process — or with a plain ``step()`` that adds the
    fixed ``batch_size`` given at construction.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        batch_size: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a bigbatch.schedules.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.batch_size = None if batch_size is None else int(check_positive("batch_size", batch_size))
        self.samples = 0.0
        self._ready = False  # the base class takes one step during __init__; it must not advance
        super().__init__(optimizer, last_epoch)
        self._ready = True

    def get_lr(self) -> list[float]:
        factor = self.schedule(self.samples) / self.schedule.peak_lr
        return [float(base) * factor for base in self.base_lrs]

    def step(self, samples: float | None = None) -> None:  # type: ignore[override]
        """Move to ``samples`` seen (or add ``batch_size`` when omitted) and set the LRs."""
        if self._ready:
            if samples is None:
                if self.batch_size is None:
                    raise ValueError("step() needs samples=... (or construct SampleLR with batch_size=)")
                self.samples += self.batch_size
            else:
                self.samples = check_nonnegative("samples", samples)
        super().step()

    def state_dict(self) -> dict[str, Any]:
        """Counters only; the schedule itself is configuration, given again at construction."""
        return {
            "samples": self.samples,
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": [float(b) for b in self.base_lrs],
            "_last_lr": [float(x) for x in self._last_lr],
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n = check_nonnegative("samples", state_dict["samples"])
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "samples"})
        self.samples = n
        # Re-apply so the optimizer's LRs match the restored position.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

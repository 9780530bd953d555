"""From a :class:`PlanConfig` to a plan: read the study, the throughput, plan every target, derive the schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bigbatch._checks import check_int_positive
from bigbatch.plan.config import PlanConfig
from bigbatch.plan.priors import SURGE_NOTE, Estimate, estimate_priors
from bigbatch.plan.schedule import DerivedSchedule, derive_schedule
from bigbatch.plan.study import StudyFits, TargetFit, read_study
from bigbatch.plan.tradeoff import Plan, candidate_batch_sizes, make_plan, parse_duration, throughput_from_run

__all__ = ["PlanResult", "plan_study", "PriorsResult", "plan_priors", "PRIOR_FIELDS"]

PRIOR_FIELDS = ("params", "tokens", "target_loss", "seq_len", "ref_lr", "ref_tokens")
"""PlanConfig fields that ask for the published priors (used without ``study``)."""


@dataclass(slots=True)
class PlanResult:
    """Plans for every determined target; ``selected`` is the one ``--target`` (or the hardest) names."""

    study: StudyFits
    plans: list[Plan]
    selected: Plan
    undetermined: list[TargetFit]
    throughput: float | None
    throughput_info: dict[str, Any] | None
    efficiency: float
    budget_gpu_hours: float | None
    deadline_seconds: float | None
    micro_batch: int = 1
    schedule: DerivedSchedule | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        sel = self.selected.to_dict()
        return {
            "study": self.study.source,
            "workload": self.study.workload,
            "metric_name": self.study.metric_name,
            "higher_is_better": self.study.higher_is_better,
            "target": sel["target"],
            "b_noise": sel["b_noise"],
            "s_min": sel["s_min"],
            "e_min": sel["e_min"],
            "knee": sel["knee"],
            "candidates": sel["candidates"],
            "fastest_within_budget": sel["fastest_within_budget"],
            "cheapest_within_deadline": sel["cheapest_within_deadline"],
            "throughput_per_gpu": self.throughput,
            "throughput_source": self.throughput_info,
            "efficiency": self.efficiency,
            "micro_batch": self.micro_batch,
            "budget_gpu_hours": self.budget_gpu_hours,
            "deadline_seconds": self.deadline_seconds,
            "targets": [p.to_dict() for p in self.plans]
            + [{"target": f.target, "b_crit": None, "reason": f.reason} for f in self.undetermined],
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "notes": list(self.notes),
        }


@dataclass(slots=True)
class PriorsResult:
    """The published priors evaluated on the inputs of a :class:`PlanConfig` without a study."""

    params: float | None
    tokens: float | None
    target_loss: float | None
    seq_len: int | None
    estimates: list[Estimate]
    notes: list[str] = field(default_factory=list)
    ref_lr: float | None = None
    ref_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "priors",
            "inputs": {"params": self.params, "tokens": self.tokens, "target_loss": self.target_loss,
                       "seq_len": self.seq_len, "ref_lr": self.ref_lr, "ref_tokens": self.ref_tokens},
            "priors": [e.to_dict(self.seq_len) for e in self.estimates],
            "notes": list(self.notes),
        }


def _given_flags(cfg: PlanConfig, names) -> list[str]:
    """The flags of the fields in ``names`` whose value differs from the default."""
    defaults = PlanConfig()
    return ["--" + n.replace("_", "-") for n in names if getattr(cfg, n) != getattr(defaults, n)]


def plan_priors(cfg: PlanConfig) -> PriorsResult:
    """The published priors for ``cfg.params``/``tokens``/``target_loss`` (no study); ValueError on bad input."""
    if cfg.study is not None:
        raise ValueError("plan_priors is for a plan without a study; use plan_study")
    study_only = [f.name for f in dataclasses.fields(PlanConfig) if f.name not in PRIOR_FIELDS + ("study", "json")]
    extra = _given_flags(cfg, study_only)
    if extra:
        raise ValueError(
            f"{', '.join(extra)}: only with --study DIR (they plan from a measured study); without it only --params, "
            "--tokens, --target-loss, --seq-len, --ref-lr and --ref-tokens (the published priors) take effect")
    estimates = estimate_priors(params=cfg.params, tokens=cfg.tokens, target_loss=cfg.target_loss,
                                seq_len=cfg.seq_len, ref_lr=cfg.ref_lr, ref_tokens=cfg.ref_tokens)
    notes = ["these are published fits made under their papers' conditions: starting points to check with "
             "`bigbatch study`, not measurements of this model"]
    if cfg.seq_len is None and any(e.value is not None and e.prior.unit.startswith("tokens") for e in estimates):
        notes.append("give --seq-len to see the token batches in sequences")
    notes.append(SURGE_NOTE)
    return PriorsResult(cfg.params, cfg.tokens, cfg.target_loss, cfg.seq_len, estimates, notes,
                        ref_lr=cfg.ref_lr, ref_tokens=cfg.ref_tokens)


def plan_study(cfg: PlanConfig) -> PlanResult:
    """Read ``cfg.study`` and plan every determined target; ValueError (one line) on bad input."""
    if cfg.study is None:
        raise ValueError("--study DIR is required (a directory written by `bigbatch study`) to plan from a "
                         "measurement; without one, give --params N and --tokens D for the published priors")
    extra = _given_flags(cfg, PRIOR_FIELDS)
    if extra:
        raise ValueError(f"{', '.join(extra)} give the published priors without a study; with --study they cannot "
                         "take effect (drop them, or drop --study)")
    if cfg.throughput is not None and cfg.throughput_from is not None:
        raise ValueError("give --throughput or --throughput-from, not both")
    study = read_study(cfg.study)
    throughput, info = cfg.throughput, None
    if cfg.throughput_from is not None:
        throughput, info = throughput_from_run(cfg.throughput_from)
    elif throughput is not None:
        info = {"flag": "--throughput"}
    micro = cfg.micro_batch
    if micro is None:
        micro = (info or {}).get("micro_batch_size") or 1
    deadline = parse_duration(cfg.deadline) if cfg.deadline is not None else None
    undetermined = [f for f in study.fits if not f.determined]
    if cfg.target is not None:
        match = [f for f in study.fits if f.target is not None and abs(f.target - cfg.target) <= 1e-9 * max(1.0, abs(f.target))]
        if not match:
            have = ", ".join(f"{f.target:g}" for f in study.fits if f.target is not None)
            raise ValueError(f"--target {cfg.target:g} is not a target of {study.source}; it has: {have}")
        if not match[0].determined:
            raise ValueError(f"--target {cfg.target:g}: B_crit is undetermined ({match[0].reason}); cannot plan on it")
        selected_fit = match[0]
    else:
        selected_fit = study.hardest()
    required = [check_int_positive("--batch-sizes", b) for b in cfg.batch_sizes]
    plans = []
    for f in study.fits:
        if not f.determined:
            continue
        bs = candidate_batch_sizes(f.b_noise, cfg.span, required)
        plans.append(make_plan(
            f, bs, gpus=cfg.gpus, micro_batch=micro, throughput=throughput, efficiency=cfg.efficiency,
            budget_gpu_hours=cfg.budget_gpu_hours, deadline_seconds=deadline, required=required,
        ))
    selected = next(p for p in plans if p.fit is selected_fit)
    result = PlanResult(
        study=study, plans=plans, selected=selected, undetermined=undetermined, throughput=throughput,
        throughput_info=info, efficiency=cfg.efficiency, budget_gpu_hours=cfg.budget_gpu_hours,
        deadline_seconds=deadline, micro_batch=micro, notes=list(study.notes),
    )
    if cfg.write_schedule is not None or cfg.granularity is not None or cfg.factor != 1.0:
        if cfg.write_schedule is None:
            raise ValueError("--factor and --granularity shape the schedule: give --write-schedule FILE too")
        g = cfg.granularity
        if g is None:
            g = micro * max(cfg.gpus or [1])
        result.schedule = derive_schedule(study, factor=cfg.factor, granularity=g)
    return result

"""Planning a run from a measured critical batch size: batch, GPUs, time, cost, and a batch schedule.

A study (``bigbatch study``) measures the steps/samples trade-off of McCandlish et al. 2018,
``S = S_min(1 + B_noise/B)``, ``E = E_min(1 + B/B_noise)``. This package turns it into decisions:

- :func:`make_plan`: steps, samples, wall time and GPU-hours for candidate (batch, GPU count)
  pairs, given a per-GPU throughput and a scaling efficiency; the fastest plan within a GPU-hour
  budget and the cheapest within a deadline.
- :func:`derive_schedule`: from B_crit at several targets, a batch-size schedule in samples
  (Megatron's threshold form) that grows the batch as the loss passes each target; the trainer
  follows it with :class:`bigbatch.adaptive.schedule.ScheduleController`.
- :func:`plan_study`: both, from a :class:`PlanConfig` (what ``bigbatch plan`` runs).
- :func:`estimate_priors`, :func:`plan_priors`: before any study, the published estimates of the
  optimal batch size and LR from N, D or a target loss, each with its source, conditions and
  fitted range (``bigbatch plan --params N --tokens D``).
"""

from __future__ import annotations

from bigbatch.adaptive.schedule import format_batch_schedule, load_batch_schedule, parse_batch_schedule
from bigbatch.plan.config import PlanConfig
from bigbatch.plan.planner import PlanResult, PriorsResult, plan_priors, plan_study
from bigbatch.plan.priors import PRIORS, Estimate, FittedRange, Prior, estimate_priors
from bigbatch.plan.schedule import DerivedSchedule, derive_schedule, round_batch
from bigbatch.plan.study import StudyFits, TargetFit, fits_from_results, read_study
from bigbatch.plan.tradeoff import (
    Candidate,
    Plan,
    candidate_batch_sizes,
    cheapest_within,
    fastest_within,
    make_plan,
    parse_duration,
    samples_at,
    steps_at,
    throughput_from_run,
)

__all__ = [
    "PlanConfig",
    "PlanResult",
    "plan_study",
    "Prior",
    "FittedRange",
    "Estimate",
    "PRIORS",
    "estimate_priors",
    "PriorsResult",
    "plan_priors",
    "TargetFit",
    "StudyFits",
    "read_study",
    "fits_from_results",
    "Candidate",
    "Plan",
    "steps_at",
    "samples_at",
    "candidate_batch_sizes",
    "make_plan",
    "fastest_within",
    "cheapest_within",
    "parse_duration",
    "throughput_from_run",
    "DerivedSchedule",
    "derive_schedule",
    "round_batch",
    "parse_batch_schedule",
    "format_batch_schedule",
    "load_batch_schedule",
]

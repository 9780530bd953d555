"""Configuration of ``bigbatch plan``: one dataclass, every flag mirrors a field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PlanConfig"]


@dataclass(kw_only=True, slots=True)
class PlanConfig:
    """What ``bigbatch plan`` reads and how it turns the fit into a plan (docs/plan.md).

    With ``study`` it plans from the measured trade-off; without it, ``params``/``tokens``/
    ``target_loss`` (and ``ref_lr``/``ref_tokens``) give the published priors (``bigbatch.plan.priors``) instead."""

    study: Path | None = None
    """Study directory (or its results.json) written by ``bigbatch study``."""
    params: float | None = None
    """Without ``study``: the model's non-embedding parameter count N (e.g. 1.2e9), for the published priors."""
    tokens: float | None = None
    """Without ``study``: the training tokens D (e.g. 1e11), for the published priors."""
    target_loss: float | None = None
    """Without ``study``: the C4 loss the run should reach, for MiniCPM's batch-size prior."""
    seq_len: int | None = None
    """Without ``study``: tokens per sequence, to give the priors' token batches in sequences too."""
    ref_lr: float | None = None
    """Without ``study``: a peak LR tuned on a shorter run (with ``ref_tokens``), moved to ``tokens`` by the token-horizon rule."""
    ref_tokens: float | None = None
    """Without ``study``: the training tokens of the run ``ref_lr`` was tuned on."""
    target: float | None = None
    """Target to plan for, when the study measured several (default: the hardest)."""
    batch_sizes: list[int] = field(default_factory=list)
    """Batch sizes to add to the candidates (default candidates: powers of two around B_noise)."""
    span: int = 4
    """Octaves either side of B_noise covered by the power-of-two candidates."""
    gpus: list[int] | None = None
    """GPU counts to plan for (default 1,2,4,8; needs a throughput)."""
    micro_batch: int | None = None
    """Per-GPU micro-batch the throughput holds at: B/G must be a whole multiple of it for (B, G) to
    be realisable (default: the --throughput-from run's micro-batch, else 1)."""
    throughput: float | None = None
    """Per-GPU throughput in samples/s."""
    throughput_from: Path | None = None
    """A ``bigbatch train`` run directory: per-GPU throughput = median steady samples_per_s ÷ world size."""
    efficiency: float = 1.0
    """Scaling efficiency in (0, 1]: the fraction of the per-GPU throughput realised on every GPU."""
    budget_gpu_hours: float | None = None
    """GPU-hour budget: mark the fastest candidate within it."""
    deadline: str | None = None
    """Wall-time deadline (90m, 2h, 3600s, 1.5d): mark the cheapest candidate within it."""
    write_schedule: Path | None = None
    """Write a batch-size schedule (threshold form, in samples) grown through B_crit of each target."""
    factor: float = 1.0
    """Schedule batch at each target = factor × B_crit there."""
    granularity: int | None = None
    """Schedule batches are multiples of this (micro-batch × GPUs; default: the micro-batch × the largest of --gpus)."""
    json: bool = False
    """Print the plan as JSON instead of tables."""
    plot: Path | None = None
    """Draw the time–compute frontier (steps vs samples, candidates on it) to this PNG."""

"""Configuration of one training run: one dataclass; ``bigbatch train``'s flags are generated from it.

A new field (with its docstring, which becomes the flag's help) is a new ``--flag``; see
``bigbatch/cli/_fields.py`` for how names, types and defaults map to flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bigbatch._config import ConfigMixin

__all__ = ["TrainConfig"]


@dataclass(kw_only=True, slots=True)
class TrainConfig(ConfigMixin):
    """One training run. ``None`` means "the workload's default"."""

    workload: str = "mnist1d"
    """Built-in workload name (mnist1d, bytelm, linreg) or ``module:factory``."""
    workload_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the workload factory, e.g. model=mlp."""
    batch_size: int | None = None
    """Global batch size in examples = micro-batch × accumulation steps × world size."""
    micro_batch_size: int | None = None
    """Examples per forward/backward on one process; default: the whole per-rank batch."""
    lr: float | None = None
    """Peak learning rate at ``base_batch_size`` (or at ``batch_size`` when that is unset)."""
    optimizer: str | None = None
    """Optimizer name: sgd, adamw, lars, lamb, merit."""
    momentum: float | None = None
    """Momentum (sgd, lars)."""
    weight_decay: float | None = None
    """Weight decay (applied to ≥2-D tensors only by ``bigbatch.optim.param_groups``)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Further optimizer keyword arguments (betas, eps, trust_coefficient, ...)."""
    warmup_samples: int | None = None
    """Learning-rate warmup length in samples (linear)."""
    schedule: str = "constant"
    """Decay shape after warmup (see ``bigbatch.schedules``)."""
    rule: str | None = None
    """Scaling rule relating the LR to the batch size (used with ``base_batch_size`` and adaptive batches)."""
    base_batch_size: int | None = None
    """Batch size at which ``lr`` (and warmup) were tuned; the rule rescales to the running batch."""
    budget_samples: int | None = None
    """Training budget in samples; the run stops there."""
    budget_epochs: float | None = None
    """Training budget in epochs (overrides ``budget_samples``)."""
    eval_every_samples: int | None = None
    """Evaluate every this many samples (default: 20 evaluations per budget)."""
    checkpoint_every_samples: int | None = None
    """Checkpoint every this many samples (default: at every evaluation); 0 disables periodic checkpoints."""
    keep_checkpoints: int = 2
    """How many periodic checkpoints to keep on disk."""
    log_every_steps: int = 10
    """Write a metrics record every this many optimizer steps."""
    target: float | None = None
    """Stop when the evaluation metric reaches this value (in its direction)."""
    seed: int = 0
    """Seed for the model initialisation and the data order."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``) instead of DDP."""
    nproc: int = 1
    """``bigbatch train`` launches torchrun with this many processes on this host (1: no launch)."""
    max_restarts: int = 0
    """torchrun restarts after a worker failure; restarted workers resume from the newest checkpoint."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    out: str = "runs/train"
    """Output directory: metrics.jsonl, summary.json, checkpoints/."""
    resume: bool = False
    """Continue from the newest checkpoint in ``out``."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in this invocation (checkpointed; resume continues)."""
    noise_scale: bool = False
    """Measure the gradient noise scale B_simple while training."""
    noise_mode: str = "auto"
    """Where the two batch sizes come from: auto (ddp under DDP, fsdp under FSDP2, accumulation with ≥2 micro-batches, else split), accumulation, ddp, fsdp, split."""
    noise_every: int | None = None
    """Measure one step in N (default: every step on CPU, every 10th on CUDA, which keeps the cost under 1%)."""
    noise_beta: float = 0.99
    """EMA factor per reading of the |G|² and tr(Σ) estimators."""
    adaptive: str | None = None
    """Adaptive batch size controller: noise, normtest or ramp."""
    adaptive_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the adaptive controller."""
    ema_horizon_samples: int | None = None
    """Keep an EMA of the weights with this horizon in samples (decay per step ρ^B; Busbridge et al. 2023) and evaluate it too."""
    average_last: int = 0
    """Keep the last N checkpoints and evaluate their average at the end (0: off)."""
    progress: str = "auto"
    """Progress display: auto (bar on a terminal, lines otherwise), bar, lines, none."""

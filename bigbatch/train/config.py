"""Configuration of one training run: one dataclass; ``bigbatch train``'s flags are generated from it.

A new field (with its docstring, which becomes the flag's help) is a new ``--flag``; see
``bigbatch/cli/_fields.py`` for how names, types and defaults map to flags.
"""

from __future__ import annotations

import math
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
    """Optimizer: sgd, adamw, adam, lars, lamb, merit, or ``module:Class`` (any registered name; docs/optim.md)."""
    momentum: float | None = None
    """Momentum (SGD-family optimizers: sgd, lars)."""
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
    record_targets: list[float] = field(default_factory=list)
    """Further metric values whose first crossing is recorded (summary.json ``crossings``) without stopping the run."""
    target_resolution: float | None = None
    """Locate each first crossing of ``target`` and ``record_targets`` to within this fraction of its samples: where an evaluation shows one crossed and the last evaluation is further back, the interval is replayed from an in-memory snapshot with dense evaluation (docs/training.md); None: at the evaluations only."""
    stall_fraction: float | None = None
    """Stop the run as "stalled" once this fraction of its budget (samples, or ``max_steps`` if that comes first) has passed and an evaluation shows no progress from the first one, at step 0 (less than 5% of the way to ``target``; without a target: not better): a run that never learns, or fell back to where it started (an LR far too high), then frees its worker instead of running out its budget; None: never."""
    seed: int = 0
    """Seed for the model initialisation and the data order."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``) instead of DDP."""
    nproc: int = 1
    """``bigbatch train`` launches torchrun with this many processes on this host (1: no launch;
    with ``nnodes`` > 1, processes per host)."""
    max_restarts: int = 0
    """torchrun restarts after a worker failure; restarted workers resume from the newest checkpoint."""
    nnodes: int = 1
    """Hosts in the run: each runs the same ``bigbatch train`` command with its own ``node_rank``,
    and torchrun joins them through the c10d rendezvous at ``rdzv_endpoint`` (docs/cluster.md)."""
    node_rank: int = 0
    """This host's index among ``nnodes`` (0 to nnodes-1); node 0 hosts the rendezvous."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous for a run on several hosts: an address of the node_rank 0
    host that the others reach, and a free port there."""
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
    """Measure one step in N (default: every step on CPU; on CUDA every 10th, every 50th in split mode, which keeps the cost under 1%)."""
    noise_beta: float = 0.99
    """EMA factor per reading of the |G|² and tr(Σ) estimators."""
    adaptive: str | None = None
    """Adaptive batch size controller: noise, normtest, ramp or schedule (docs/adaptive.md)."""
    adaptive_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the adaptive controller."""
    batch_schedule: str | None = None
    """Batch-size schedule in samples, ``"0:64,20000:128,..."`` (K/M/B/T suffixes allowed) or a file holding one (``bigbatch plan --write-schedule``); the LR follows the rule. Short for ``adaptive`` = schedule."""
    ema_horizon_samples: int | None = None
    """Keep an EMA of the weights with this horizon in samples (decay per step ρ^B; Busbridge et al. 2023) and evaluate it too."""
    average_last: int = 0
    """Keep the last N checkpoints and evaluate their average at the end (0: off)."""
    progress: str = "auto"
    """Progress display: auto (bar on a terminal, lines otherwise), bar, lines, none."""
    overwrite: bool = False
    """Delete the run already in ``out`` (checkpoints, metrics, summary) and start afresh; without it such a directory is refused unless ``resume`` is set."""

    def resolve(self, workload: Any) -> "Resolved":
        """The values a run uses (see :func:`resolve`): defaults from ``workload``, every range checked."""
        return resolve(self, workload)


# ---- resolution: the config with a workload's defaults filled in and validated ---------------

__all__ += ["Resolved", "resolve"]


@dataclass(frozen=True, slots=True)
class Resolved:
    """The values a run uses: ``None`` fields replaced by the workload's defaults, ranges checked."""

    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    optimizer_args: dict[str, Any]
    budget: int
    warmup: int
    eval_every: int
    ckpt_every: int
    log_every: int
    base_batch: int
    noise_every: int | None


def resolve(cfg: TrainConfig, workload: Any) -> Resolved:
    """Fill ``cfg``'s unset fields from ``workload.defaults`` and check every range.

    ``None`` means "unset"; any other value is the user's and is checked (``batch_size=0`` is an
    error, not the default). Errors name the field.
    """
    from bigbatch._checks import check_int_positive, check_positive

    d = workload.defaults
    batch = check_int_positive("batch_size", d.batch_size if cfg.batch_size is None else cfg.batch_size)
    optimizer = d.optimizer if cfg.optimizer is None else cfg.optimizer
    weight_decay = d.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if cfg.budget_epochs is not None:
        budget = int(round(check_positive("budget_epochs", cfg.budget_epochs) * workload.dataset_size))
    else:
        budget = check_int_positive("budget_samples", d.budget_samples if cfg.budget_samples is None else cfg.budget_samples)
    # A workload's default warmup is cut to a short budget; a warmup the user asked for is not.
    warmup = min(d.warmup_samples, budget) if cfg.warmup_samples is None else int(cfg.warmup_samples)
    if warmup < 0:
        raise ValueError(f"warmup_samples must be >= 0, got {warmup}")
    if cfg.eval_every_samples is not None:
        eval_every = check_int_positive("eval_every_samples", cfg.eval_every_samples)
    else:
        eval_every = max(batch, budget // 20)
    ckpt_every = eval_every if cfg.checkpoint_every_samples is None else int(cfg.checkpoint_every_samples)
    if ckpt_every < 0:
        raise ValueError(f"checkpoint_every_samples must be >= 0, got {cfg.checkpoint_every_samples}")
    if cfg.target is not None and not math.isfinite(cfg.target):
        raise ValueError(f"target must be a finite number, got {cfg.target}")
    for t in cfg.record_targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"record_targets must be finite numbers, got {t!r}")
    if cfg.target_resolution is not None or cfg.stall_fraction is not None:
        from bigbatch._checks import check_in_range

        if cfg.target_resolution is not None:
            check_in_range("target_resolution", cfg.target_resolution, 0.0, 1.0, lo_inclusive=False)
        if cfg.stall_fraction is not None:
            check_in_range("stall_fraction", cfg.stall_fraction, 0.0, 1.0, lo_inclusive=False)
    base = batch if cfg.base_batch_size is None else check_int_positive("base_batch_size", cfg.base_batch_size)
    noise_every = None if cfg.noise_every is None else check_int_positive("noise_every", cfg.noise_every)
    return Resolved(
        batch_size=batch,
        lr=check_positive("lr", d.lr if cfg.lr is None else cfg.lr),
        optimizer=optimizer,
        momentum=d.momentum if cfg.momentum is None else cfg.momentum,
        weight_decay=weight_decay,
        optimizer_args={**d.extra, **cfg.optimizer_args} if optimizer == d.optimizer else dict(cfg.optimizer_args),
        budget=budget,
        warmup=warmup,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
        log_every=check_int_positive("log_every_steps", cfg.log_every_steps),
        base_batch=base,
        noise_every=noise_every,
    )

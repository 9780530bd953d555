"""Configuration of a critical-batch-size study: one dataclass; ``bigbatch study``'s flags are generated from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bigbatch._checks import (
    check_choice,
    check_in_range,
    check_int_positive,
    check_positive,
)
from bigbatch._config import ConfigMixin
from bigbatch.rules import rule_names

__all__ = ["StudyConfig", "RULES", "EXECUTORS"]

#: Scaling rules the trainer applies from ``base_batch_size`` to each cell's batch size.
RULES = rule_names()

#: Where a study's cells run (``StudyConfig.executor``).
EXECUTORS = ("local", "ray")


@dataclass(kw_only=True, slots=True)
class StudyConfig(ConfigMixin):
    """A sweep over batch sizes × learning-rate multipliers × seeds (Shallue et al. 2018).

    The defaults are tuned so that ``bigbatch study`` with no arguments runs on two CPU cores
    in a few minutes on MNIST-1D and still shows all three regimes (docs/study.md).
    ``None`` means "the workload's default".
    """

    workload: str = "mnist1d"
    """Built-in workload name (mnist1d, bytelm, linreg) or ``module:factory``."""
    workload_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the workload factory, e.g. model=mlp."""
    batch_sizes: list[int] | None = None
    """Batch sizes to measure (global, in examples); default: ``base_batch_size·2^i``, i = 0..7."""
    lr: float | None = None
    """Learning rate at ``base_batch_size`` (the recipe being scaled)."""
    base_batch_size: int | None = None
    """Batch size at which ``lr`` was tuned; the rule rescales the LR from there."""
    rule: str | None = None
    """LR scaling rule applied by the trainer from ``base_batch_size`` to each batch size
    (default: the workload's study preset, else linear); ``lr_grid`` multiplies its LR."""
    lr_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """Multipliers of the rule's LR tried at every batch size; each batch size keeps the one
    reaching the target in the fewest steps (Shallue et al. 2018 tune the LR per batch size)."""
    lr_extend: int = 2
    """Extensions of the LR grid per batch size: where the best multiplier is the largest (or
    smallest) tried there, one more multiplier ×2 (or ÷2) is run with the same seeds, until the
    best is interior or this many were added at that batch size; 0: the grid only."""
    optimizer: str | None = None
    """Optimizer name (sgd, adamw, ...)."""
    momentum: float | None = None
    """Momentum (sgd, lars)."""
    weight_decay: float | None = None
    """Weight decay."""
    warmup_samples: int | None = None
    """Linear LR warmup in samples (the same number of samples at every batch size)."""
    target: float | None = None
    """Metric value that counts as "reached" (in the workload's direction)."""
    targets: list[float] | None = None
    """Several targets measured in one sweep (instead of ``target``): each cell runs to the
    hardest (or its budget) and records when it first reached each; results.json then has a
    ``by_target`` entry per target (best LR, fit, B_crit interval, B_simple at that target),
    and its single-target keys describe the hardest."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds run for every (batch size, LR) cell; several give the bootstrap real replicates."""
    budget: int | None = None
    """Per-cell budget in samples; a cell that has not reached the target by then is "not reached"."""
    budget_steps: int | None = None
    """Per-cell budget in optimizer steps (caps small-batch cells whose LR is too low or unstable)."""
    eval_every_samples: int | None = None
    """Evaluate at least this many samples apart: the resolution of samples-to-target at
    small batch sizes, so keep it a small fraction of ``E_min``."""
    eval_every_steps: int | None = None
    """Evaluate at least this many steps apart: the resolution of steps-to-target at large
    batch sizes (a cell evaluates every max(eval_every_samples, eval_every_steps·B) samples)."""
    target_resolution: float = 0.02
    """Locate each cell's first crossing of every target to within this fraction of its samples:
    where an evaluation shows a target crossed and the previous one is further back, the cell
    replays that interval from an in-memory snapshot, evaluating densely (docs/study.md); 0: off
    (crossings known to one evaluation interval)."""
    stall_fraction: float = 0.1
    """A cell stops as "stalled" (not reached) once this fraction of its budget is spent and an
    evaluation shows it back where it started (less than 5% of the way from its first evaluation
    to the target): an LR so high that the run never learns, or collapses, frees its worker
    instead of running out the budget; 0: off (every cell runs to its target or budget)."""
    device: str = "auto"
    """cpu, cuda or auto. With cuda and several visible GPUs, cells run one per GPU in parallel."""
    jobs: int = 0
    """Cells run at the same time in worker processes; 0: ``cells_per_gpu`` per visible GPU with
    cuda, on a CPU one single-threaded worker per core (at most 8); 1: in this process. With
    ``executor`` ray: cells in flight on the cluster; 0: as many as its resources hold."""
    cells_per_gpu: int | None = None
    """With cuda: cells run at the same time on each GPU (worker processes sharing it), so that
    small cells fill it; default: the workload's study preset, else 1. Not for a CPU (use jobs)."""
    executor: str = "local"
    """Where cells run: local (this host: in this process or worker processes, see ``jobs``)
    or ray (one Ray task per cell on a Ray cluster; needs ``pip install bigbatch[ray]``;
    docs/cluster.md)."""
    ray_address: str | None = None
    """Ray cluster to run cells on with ``executor`` ray: the head's host:port, ray://host:port,
    or auto (the cluster started on this host by ``ray start``); default: the RAY_ADDRESS
    environment variable, else a cluster started on this host, else a new Ray instance here."""
    ray_cpus_per_cell: float = 1.0
    """CPUs each cell's Ray task asks for (and its torch threads); a cell on a GPU may ask for 0."""
    cell_retries: int = 2
    """With ``executor`` ray: times a cell is started again when its worker process or node dies
    mid-cell (it restarts from scratch); a cell that raises an error is not retried."""
    out: str = "runs/study"
    """Run directory: results.json, report.html, PNG plots, cells/<cell>/."""
    bootstrap: int = 1000
    """Bootstrap resamples for the B_crit interval."""
    confidence: float = 0.9
    """Coverage of the B_crit interval."""
    progress: str = "auto"
    """Progress display: auto (bar on a terminal, lines otherwise), bar, lines, none."""

    def resolve(self) -> "StudyConfig":
        """Check every field and normalise the lists (sorted, no repeats); return ``self``.

        A bad value raises ``ValueError`` naming the field and its allowed range. Defaults
        that depend on the workload (``None`` fields) are filled per study by
        ``bigbatch.study.resolve_study``, which needs the loaded workload.
        """
        if self.batch_sizes is not None:
            if not self.batch_sizes:
                raise ValueError("batch_sizes must name at least one batch size")
            self.batch_sizes = sorted({check_int_positive("batch_sizes", b) for b in self.batch_sizes})
        if not self.lr_grid:
            raise ValueError("lr_grid must name at least one multiplier")
        self.lr_grid = sorted({check_positive("lr_grid", m) for m in self.lr_grid})
        if isinstance(self.lr_extend, bool) or not isinstance(self.lr_extend, int) or self.lr_extend < 0:
            raise ValueError(f"lr_extend (--lr-extend) must be an integer >= 0, got {self.lr_extend!r}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds must be integers >= 0, got {s!r}")
        self.seeds = sorted(set(self.seeds))
        if self.lr is not None:
            check_positive("lr", self.lr)
        if self.base_batch_size is not None:
            check_int_positive("base_batch_size", self.base_batch_size)
        if self.rule is not None:
            check_choice("rule", self.rule, RULES)
        if self.budget is not None:
            check_int_positive("budget", self.budget)
        if self.budget_steps is not None:
            check_int_positive("budget_steps", self.budget_steps)
        if self.eval_every_samples is not None:
            check_int_positive("eval_every_samples", self.eval_every_samples)
        if self.eval_every_steps is not None:
            check_int_positive("eval_every_steps", self.eval_every_steps)
        if self.warmup_samples is not None and (not isinstance(self.warmup_samples, int) or self.warmup_samples < 0):
            raise ValueError(f"warmup_samples must be an integer >= 0, got {self.warmup_samples!r}")
        if self.target is not None:
            check_in_range("target", self.target, float("-inf"), float("inf"), lo_inclusive=False)
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 0:
            raise ValueError(f"jobs must be an integer >= 0, got {self.jobs!r}")
        if self.cells_per_gpu is not None:
            check_int_positive("cells_per_gpu", self.cells_per_gpu)
            if self.jobs:
                raise ValueError("jobs and cells_per_gpu were both given (--jobs, --cells-per-gpu): give one")
        f = self.stall_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"stall_fraction must be 0 (off) or a fraction in (0, 1), got {f!r}")
        r = self.target_resolution
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"target_resolution must be 0 (off) or a fraction in (0, 1), got {r!r}")
        check_choice("executor", self.executor, EXECUTORS)
        if self.executor != "ray":
            for name, default in (("ray_address", None), ("ray_cpus_per_cell", 1.0), ("cell_retries", 2)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} applies to the Ray executor only; executor must be ray "
                                     f"when {name} is given (got {name}={getattr(self, name)!r})")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise ValueError(f"ray_address must be host:port, ray://host:port or auto, got {self.ray_address!r}")
        if (isinstance(self.ray_cpus_per_cell, bool) or not isinstance(self.ray_cpus_per_cell, (int, float))
                or not 0 <= self.ray_cpus_per_cell < float("inf")):
            raise ValueError(f"ray_cpus_per_cell must be a number >= 0, got {self.ray_cpus_per_cell!r}")
        if isinstance(self.cell_retries, bool) or not isinstance(self.cell_retries, int) or self.cell_retries < 0:
            raise ValueError(f"cell_retries must be an integer >= 0, got {self.cell_retries!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 10:
            raise ValueError(f"bootstrap must be an integer >= 10, got {self.bootstrap!r}")
        check_in_range("confidence", self.confidence, 0.0, 1.0, lo_inclusive=False)
        check_choice("progress", self.progress, ("auto", "bar", "lines", "none"))
        return self

"""The ``Workload`` protocol and the samplers the trainer draws global batches from.

A workload is what a user implements to study their own model: it builds the model, turns
sample indices into a batch, computes the *summed* loss and its normaliser (examples or
tokens), and evaluates a metric. Keeping the loss a sum with an explicit count is what lets
the trainer make k accumulated micro-batches equal one big batch exactly (docs/workloads.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Batch",
    "Workload",
    "WorkloadDefaults",
    "EpochSampler",
    "StreamSampler",
    "move_batch",
]

#: A batch is a mapping of names to tensors; the first dimension indexes examples.
Batch = Mapping[str, torch.Tensor]


@dataclass(kw_only=True, slots=True)
class WorkloadDefaults:
    """A workload's default recipe: what ``bigbatch train --workload NAME`` uses."""

    batch_size: int
    """Global batch size in examples."""
    lr: float
    """Peak learning rate at ``batch_size``."""
    optimizer: str = "sgd"
    """Optimizer name in ``bigbatch.optim``'s registry."""
    budget_samples: int = 0
    """Training budget in samples (examples)."""
    target: float | None = None
    """A metric value worth reaching (used by ``bigbatch study`` when no target is given)."""
    warmup_samples: int = 0
    """Linear warmup length in samples."""
    weight_decay: float = 0.0
    """Decoupled (AdamW/LAMB) or L2 (SGD/LARS) weight decay, as the optimizer defines it."""
    momentum: float = 0.9
    """Momentum for sgd/lars."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further optimizer keyword arguments (betas, eps, ...)."""


@runtime_checkable
class Workload(Protocol):
    """What ``bigbatch train`` / ``bigbatch study`` need from a workload.

    Implement it in your own module and pass ``--workload my.module:factory``; ``factory``
    is called with the ``--workload-arg key=value`` pairs as keyword arguments.
    """

    name: str
    """Short name used in reports."""
    metric_name: str
    """Name of the evaluation metric (``accuracy``, ``val_bpb``, ...)."""
    higher_is_better: bool
    """Direction of the metric."""
    dataset_size: int
    """Training examples per epoch (a sample is one example)."""
    count_unit: str
    """What the loss is normalised by: ``"examples"`` or ``"tokens"``."""
    defaults: WorkloadDefaults
    """Default recipe."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (the caller seeds torch first)."""
        ...

    def sampler(self, seed: int) -> "EpochSampler | StreamSampler":
        """The sampler of global-batch indices for a run with this seed."""
        ...

    def fetch(self, indices: torch.Tensor) -> Batch:
        """The examples at ``indices`` (CPU tensors; the trainer moves them)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of per-unit losses, number of units)`` for one (micro-)batch.

        Units are examples or tokens (``count_unit``). Returning the sum, not the mean,
        lets the trainer divide by the count of the *whole* global batch.
        """
        ...

    def count(self, batch: Batch) -> int:
        """Number of loss units in ``batch`` without running the model."""
        ...

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        """The evaluation metric on held-out data."""
        ...


class EpochSampler:
    """Indices of a finite data set, a fresh seeded permutation each epoch.

    ``next(n)`` returns the next ``n`` indices of the stream of permutations, so a batch
    may straddle an epoch boundary; the stream is the same whatever the batch sizes are,
    which makes runs at different (or changing) batch sizes see the data in the same order.
    The state is two integers, so a resumed run continues exactly.
    """

    def __init__(self, dataset_size: int, seed: int) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
        self.dataset_size = int(dataset_size)
        self.seed = int(seed)
        self.epoch = 0
        self.pos = 0
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=g)

    def next(self, n: int) -> torch.Tensor:
        out: list[torch.Tensor] = []
        while n > 0:
            if self._perm is None:
                self._perm = self._permutation(self.epoch)
            take = min(n, self.dataset_size - self.pos)
            out.append(self._perm[self.pos : self.pos + take])
            self.pos += take
            n -= take
            if self.pos == self.dataset_size:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return torch.cat(out) if len(out) != 1 else out[0]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._perm = None


class StreamSampler:
    """Indices of an unbounded stream (fresh data every time): ``seed·2^40 + position``."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.pos = 0

    def next(self, n: int) -> torch.Tensor:
        start = self.seed * (1 << 40) + self.pos
        self.pos += n
        return torch.arange(start, start + n, dtype=torch.int64)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.pos = int(state["seed"]), int(state["pos"])


def move_batch(batch: Batch, device: torch.device, non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """The batch with every tensor on ``device``."""
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}

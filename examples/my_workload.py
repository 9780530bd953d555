"""A complete user workload for `bigbatch train` / `bigbatch study` (see docs/workloads.md).

From this folder:

    bigbatch train --workload my_workload:make -w num_examples=4096 --out runs/mine
    bigbatch study --workload my_workload:make --batch-sizes 16,64,256 --out runs/mine-study

The task: classify points drawn from a mixture of Gaussians (one per class) with a small MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.workloads import EpochSampler, WorkloadDefaults


class GaussianMixture:
    """``num_classes`` Gaussian clusters in ``dim`` dimensions; metric: held-out accuracy."""

    # What the trainer reads besides the methods.
    metric_name = "accuracy"
    higher_is_better = True
    count_unit = "examples"  # loss() returns a sum over examples (not tokens)

    def __init__(self, num_examples: int = 4096, dim: int = 16, num_classes: int = 4, hidden: int = 64, data_seed: int = 0) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be > 0, got {num_examples}")
        self.name = "gaussian-mixture"
        self.hidden = hidden
        self.dim, self.num_classes = dim, num_classes
        # The data set is fixed by data_seed, not by --seed: runs with different --seed see the
        # same examples in a different order, from a different initialisation.
        g = torch.Generator().manual_seed(data_seed)
        centres = 1.5 * torch.randn(num_classes, dim, generator=g)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, num_classes, (n,), generator=g)
            return centres[y] + torch.randn(n, dim, generator=g), y

        self.x, self.y = draw(num_examples)
        self.x_test, self.y_test = draw(1024)
        self.dataset_size = num_examples  # examples per epoch: what --budget-epochs counts
        self.defaults = WorkloadDefaults(batch_size=64, lr=0.1, optimizer="sgd", momentum=0.9, budget_samples=8 * num_examples)

    def build_model(self) -> nn.Module:
        # The trainer has seeded torch (and numpy, random) with --seed just before this call.
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.num_classes))

    def sampler(self, seed: int) -> EpochSampler:
        # A seeded permutation per epoch; its state (two integers) is saved in checkpoints.
        return EpochSampler(self.dataset_size, seed)

    def fetch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        # CPU tensors whose first dimension is the example; the trainer moves them to the device.
        return {"x": self.x[indices], "y": self.y[indices]}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["y"].shape[0])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        # The SUM over examples and how many there were: the trainer divides by the count of the
        # whole global batch, so accumulated micro-batches equal one big batch exactly.
        logits = model(batch["x"])
        return F.cross_entropy(logits.float(), batch["y"], reduction="sum"), int(batch["y"].shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        pred = model(self.x_test.to(device)).argmax(-1)
        return float((pred == self.y_test.to(device)).float().mean())


def make(**kwargs) -> GaussianMixture:
    """The factory `--workload my_workload:make` calls, with the `-w key=value` pairs as keywords."""
    return GaussianMixture(**kwargs)

"""MNIST-1D (Greydanus 2020): a small 1-D digit classification set, generated locally.

The data come from the ``mnist1d`` package's ``make_dataset`` (never its download path), with
``num_samples`` configurable, and are cached on disk keyed by the generator's arguments.
Models: a small CNN (default), an MLP, and an LSTM that reads the sequence one value per time
step (the MNIST-LSTM setting of LEGW, You et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch._checks import check_choice, check_int_positive
from bigbatch.workloads._cache import cached
from bigbatch.workloads.base import Batch, EpochSampler, WorkloadDefaults

__all__ = ["MNIST1D", "CNN1D", "MLP1D", "LSTM1D"]

SEQ_LEN = 40
N_CLASSES = 10


class CNN1D(nn.Module):
    """Three strided 1-D convolutions and a linear classifier (the MNIST-1D paper's CNN, wider)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc(h.flatten(1))


class MLP1D(nn.Module):
    """Two hidden layers of ReLU units."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SEQ_LEN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LSTM1D(nn.Module):
    """An LSTM reading the 40 values one per step; the last hidden state is classified."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(-1))
        return self.fc(out[:, -1])


_MODELS = {"cnn": CNN1D, "mlp": MLP1D, "lstm": LSTM1D}


def _generate(num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)
    return {
        "x": torch.from_numpy(d["x"]).float(),
        "y": torch.from_numpy(d["y"]).long(),
        "x_test": torch.from_numpy(d["x_test"]).float(),
        "y_test": torch.from_numpy(d["y_test"]).long(),
    }


class MNIST1D:
    """The MNIST-1D workload. Metric: test accuracy (higher is better); loss: cross-entropy per example."""

    metric_name = "accuracy"
    higher_is_better = True
    count_unit = "examples"

    def __init__(self, model: str = "cnn", num_samples: int = 40_000, data_seed: int = 42, width: int | None = None) -> None:
        self.model_name = check_choice("mnist1d model", model, _MODELS)
        self.num_samples = check_int_positive("num_samples", num_samples)
        if self.num_samples < 100:
            raise ValueError(f"num_samples must be >= 100, got {num_samples}")
        self.width = None if width is None else check_int_positive("width", width)
        self.name = f"mnist1d-{self.model_name}"
        data = cached(
            "mnist1d", {"num_samples": self.num_samples, "seed": data_seed, "v": 1}, lambda: _generate(self.num_samples, data_seed)
        )
        self.x, self.y = data["x"], data["y"]
        self.x_test, self.y_test = data["x_test"], data["y_test"]
        self.dataset_size = len(self.y)
        self.defaults = WorkloadDefaults(
            batch_size=128,
            lr=0.05,
            optimizer="sgd",
            momentum=0.9,
            budget_samples=16 * self.dataset_size,
            target=0.9,
            warmup_samples=0,
        )

    def build_model(self) -> nn.Module:
        cls = _MODELS[self.model_name]
        return cls() if self.width is None else cls(self.width)

    def sampler(self, seed: int) -> EpochSampler:
        return EpochSampler(self.dataset_size, seed)

    def fetch(self, indices: torch.Tensor) -> Batch:
        return {"x": self.x[indices], "y": self.y[indices]}

    def count(self, batch: Batch) -> int:
        return int(batch["y"].shape[0])

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["x"])
        loss = F.cross_entropy(logits.float(), batch["y"], reduction="sum")
        return loss, torch.tensor(batch["y"].shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        correct = 0
        for i in range(0, len(self.y_test), 4096):
            x = self.x_test[i : i + 4096].to(device)
            pred = model(x).argmax(-1).cpu()
            correct += int((pred == self.y_test[i : i + 4096]).sum())
        return correct / len(self.y_test)

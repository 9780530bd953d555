"""The Lightning noise callback under DDP: two CPU processes on gloo, compared with one-process NoiseMonitor."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from _dist import spawn_gloo

pytest.importorskip("lightning")

WORLD, MICRO, ACCUM, N = 2, 4, 2, 64  # 64 examples = 4 steps of 2 ranks x 2 micro-batches x 4


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.5 * torch.randn(N, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y, torch.arange(N))  # the index: which examples each rank saw


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _worker(rank: int) -> list[float]:
    import lightning.pytorch as pl

    from bigbatch.integrations.lightning import NoiseScaleCallback, configure_optimizers

    # The process group exists already (spawn_gloo); these tell Lightning it was launched externally.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")

    class M(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return configure_optimizers(self, "sgd", lr=0.05)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_data(), batch_size=MICRO, shuffle=False)

    values: list[float] = []
    seen: list[list[int]] = []

    class Rec(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[2].tolist())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "noise/b_simple" in trainer.callback_metrics and trainer.global_step > len(values):
                values.append(float(trainer.callback_metrics["noise/b_simple"]))

    noise = NoiseScaleCallback()
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_epochs=1,
                         accumulate_grad_batches=ACCUM, callbacks=[noise, Rec()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(M())
    assert noise.monitor.world_size == WORLD
    return {"values": values, "seen": seen}


def _reference(seen: list[list[list[int]]]) -> list[float]:
    """One process: each step's micro-batches are both ranks' (as the ranks saw them), the same loss."""
    from bigbatch.noise import NoiseMonitor
    from bigbatch.optim import create_optimizer

    ds, model = _data(), _net()
    mon = NoiseMonitor(model, mode="accumulation")
    opt = create_optimizer("sgd", model, lr=0.05)
    out = []
    for s in range(N // (WORLD * ACCUM * MICRO)):
        mon.begin_step()
        for r in range(WORLD):
            for j in range(ACCUM):
                idx = seen[r][s * ACCUM + j]
                with mon.micro_batch(MICRO):
                    (nn.functional.mse_loss(model(ds.tensors[0][idx]), ds.tensors[1][idx]) / (WORLD * ACCUM)).backward()
        out.append(mon.end_step().b_simple)
        opt.step()
        opt.zero_grad()
    return out


@pytest.mark.slow
def test_lightning_noise_callback_under_ddp():
    got = spawn_gloo(_worker, world=WORLD, timeout=240)
    values = [g["values"] for g in got]
    assert values[0] == values[1]  # the readings are all-reduced: every rank logs the same values
    seen = [g["seen"] for g in got]
    assert sorted(i for r in seen for b in r for i in b) == list(range(N))  # the ranks split the data
    ref = _reference(seen)
    assert len(values[0]) == len(ref) == 4
    assert values[0] == pytest.approx(ref, rel=1e-5, nan_ok=True)

"""bigbatch with Lightning: LAMB in configure_optimizers, the noise scale logged, a batch ramp mid-epoch.

    python examples/lightning_module.py                   # tiny model on CPU, ~20 s
    python examples/lightning_module.py --ramp            # accumulation driven by a ramp controller
    python examples/lightning_module.py --gpu --bf16 --width 2048 --depth 8 --steps 300
    python examples/lightning_module.py ... --no-noise    # the same run without the callback

A small MLP regresses a noisy linear target. ``configure_optimizers`` is one line; the noise
callback logs B_simple, |G|² and tr Σ (in examples) from the ``accumulate_grad_batches`` micro-
batches with ``self.log``; with ``--ramp`` a bigbatch ``RampController`` grows the global batch
from 1 to 8 micro-batches during the first epoch, the LR following the square-root rule.
"""

from __future__ import annotations

import argparse
import math
import time

import lightning.pytorch as pl
import torch
from torch import nn

from bigbatch.adaptive import create_controller
from bigbatch.integrations.lightning import BatchSizeCallback, NoiseScaleCallback, configure_optimizers
from bigbatch.schedules import Schedule


class Regression(pl.LightningModule):
    def __init__(self, width: int, depth: int, lr: float, schedule: Schedule, global_batch: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(32, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.lr, self.schedule, self.global_batch = lr, schedule, global_batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)  # a mean over the micro-batch
        self.log("train_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return configure_optimizers(self, "lamb", lr=self.lr, weight_decay=0.01, schedule=self.schedule,
                                    global_batch=self.global_batch)


class StepTimer(pl.Callback):
    """Wall time per optimizer step after ``skip`` warm-up steps (synchronised only at the two ends)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.t0, self.n0, self.per_step = skip, None, 0, math.nan

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t0 is None and trainer.global_step >= self.skip:
            self._sync()
            self.t0, self.n0 = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        if self.t0 is not None and trainer.global_step > self.n0:
            self._sync()
            self.per_step = (time.perf_counter() - self.t0) / (trainer.global_step - self.n0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--ramp", action="store_true", help="drive accumulation with a ramp controller")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no-noise", action="store_true", help="run without the noise callback (overhead baseline)")
    return p.parse_args(argv)


def build(a: argparse.Namespace) -> tuple[Regression, torch.utils.data.DataLoader]:
    """The module (LAMB + a cosine schedule in samples) and one epoch of data for ``a.steps`` steps."""
    pl.seed_everything(0, verbose=False)
    n = a.micro_batch * a.accum * a.steps
    X, w = torch.randn(n, 32), torch.randn(32, 1)
    Y = X @ w + 0.5 * torch.randn(n, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=a.micro_batch, shuffle=True)
    global_batch = a.micro_batch * a.accum  # one process here; × world size under DDP
    schedule = Schedule(peak_lr=1e-2, warmup_samples=n // 10, decay="cosine", total_samples=n)
    return Regression(a.width, a.depth, 1e-2, schedule, global_batch), loader


def trainer_for(a: argparse.Namespace, callbacks: list[pl.Callback], accum: int) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if a.gpu else "cpu", devices=1, precision="bf16-mixed" if a.bf16 else "32-true",
                      max_epochs=1, accumulate_grad_batches=accum, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def run(a: argparse.Namespace) -> dict:
    """One training run; returns the step time (seconds) and what the callbacks logged."""
    model, loader = build(a)
    n = len(loader.dataset)
    noise = None if a.no_noise else NoiseScaleCallback(every=a.every)
    timer = StepTimer(skip=min(5, a.steps // 2))
    callbacks: list[pl.Callback] = [timer]
    if noise is not None:
        callbacks.append(noise)
    accum = a.accum
    batch_cb = None
    if a.ramp:
        ramp = create_controller("ramp", start_batch=a.micro_batch, end_batch=8 * a.micro_batch,
                                 ramp_samples=n // 2, granularity=a.micro_batch)
        batch_cb = BatchSizeCallback(ramp, micro_batch_size=a.micro_batch, rule="sqrt", noise=noise)
        callbacks.append(batch_cb)
        accum = 1  # the controller sets it from the first step
    trainer = trainer_for(a, callbacks, accum)
    trainer.fit(model, loader)
    m = trainer.callback_metrics
    out = {"steps": trainer.global_step, "step_time": timer.per_step, "train_loss": float(m["train_loss"]),
           "batch_changes": batch_cb.history if batch_cb is not None else None}
    if noise is not None:
        out.update(b_simple=float(m["noise/b_simple"]), grad_sqnorm=float(m["noise/grad_sqnorm"]),
                   trace_sigma=float(m["noise/trace_sigma"]))
    return out


def main() -> None:
    r = run(parse_args())
    print(f"{r['steps']} steps, step time {r['step_time'] * 1e3:.2f} ms, final train_loss {r['train_loss']:.4f}")
    if r["batch_changes"] is not None:
        print("batch changes (step, samples, global batch):", r["batch_changes"])
    if "b_simple" in r:
        print(f"b_simple (logged): {r['b_simple']:.2f} examples "
              f"(|G|^2 {r['grad_sqnorm']:.4g}, tr Sigma {r['trace_sigma']:.4g})")


if __name__ == "__main__":
    main()

"""bigbatch in your own loop under Hugging Face Accelerate: LAMB, a schedule in samples, the noise scale.

    python examples/accelerate_loop.py                          # one process: accumulation mode
    accelerate launch --num_processes 2 examples/accelerate_loop.py   # 2 GPUs: DDP mode, one extra all-reduce
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_loop.py   # 2 CPU processes (gloo)

The LR schedule is stepped with the samples seen by the whole job (global batch × steps) and is
*not* passed to ``accelerator.prepare``: Accelerate's scheduler wrapper steps a scheduler once per
process, which runs a per-step schedule ``num_processes`` times too fast (accelerate#963).
The noise monitor reads the micro-batch gradients during backward and the accumulated gradient
before clipping; under bf16 nothing else is needed, under fp16 pass the GradScaler's scale as
``loss_scale`` (see below).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

from bigbatch.integrations import global_batch_size, rescale_for_global_batch
from bigbatch.noise import NoiseMonitor
from bigbatch.optim import create_optimizer
from bigbatch.scaling import Recipe
from bigbatch.schedules import SampleLR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, default=32, help="examples per process per micro-batch")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    a = p.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=a.accum, mixed_precision=a.precision)
    torch.manual_seed(0)
    n = 8192
    X, w = torch.randn(n, 32), torch.randn(32, 1)
    Y = X @ w + 0.5 * torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=a.micro_batch,
                                         shuffle=True, drop_last=True)

    # The recipe was tuned at batch 128; move it to the global batch this job runs.
    world = accelerator.num_processes
    batch = global_batch_size(a.micro_batch, a.accum, world)
    tuned = Recipe(batch_size=128, lr=1e-2, optimizer="lamb", dataset_size=n, warmup_epochs=0.2,
                   budget_epochs=a.epochs, schedule="cosine")
    recipe = rescale_for_global_batch(tuned, per_device_batch=a.micro_batch, accumulation=a.accum,
                                      world_size=world).recipe
    opt = create_optimizer("lamb", model, lr=recipe.lr, weight_decay=0.01)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sched = SampleLR(opt.optimizer if hasattr(opt, "optimizer") else opt, recipe.to_schedule())
    # "auto": ddp mode on a DDP model (several processes), accumulation mode on one.
    monitor = NoiseMonitor(model, mode="auto", every=1)

    samples, micro, reading = 0, 0, None
    while samples < recipe.budget_samples:
        for x, y in loader:
            if micro % a.accum == 0:
                monitor.begin_step()
            micro += 1
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)  # a mean over the micro-batch
                scaler = accelerator.scaler
                # accelerator.backward divides by the accumulation steps: with equal micro-batches
                # the step's gradient is the mean over all its examples, the monitor's default.
                # Under fp16 the GradScaler multiplies the loss: tell the monitor the factor.
                scale = None if scaler is None else scaler.get_scale() / (len(x) * a.accum)
                with monitor.micro_batch(len(x), loss_scale=scale):
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    reading = monitor.end_step()  # before clipping and unscaling
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                if accelerator.sync_gradients:
                    samples += batch
                    sched.step(samples=samples)
            if samples >= recipe.budget_samples:
                break
    accelerator.print(f"global batch {batch} on {world} process(es), lr {recipe.lr:.3g}, {samples} samples")
    accelerator.print(f"b_simple {monitor.b_simple:.2f} (|G|^2 {reading.grad_sqnorm:.4g}, tr Sigma {reading.trace_sigma:.4g}), "
                      f"mode {monitor.mode}, last loss {loss.item():.4f}")


if __name__ == "__main__":
    main()

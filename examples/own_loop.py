"""bigbatch inside your own training loop: a recipe tuned at batch 128 run at batch 1024 with
LAMB, the LR schedule advanced in samples, the gradient noise scale and a weight EMA."""

import torch
from torch import nn

from bigbatch.averaging import EMA
from bigbatch.noise import NoiseMonitor
from bigbatch.optim import LAMB, param_groups
from bigbatch.scaling import Recipe, rescale
from bigbatch.schedules import SampleLR

torch.manual_seed(0)
X, w_true = torch.randn(20_000, 32), torch.randn(32, 1)
Y = X @ w_true + 0.5 * torch.randn(20_000, 1)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

tuned = Recipe(batch_size=128, lr=1e-2, optimizer="lamb", dataset_size=len(X), warmup_epochs=0.5,
               budget_epochs=20, schedule="cosine")
big = rescale(tuned, 1024)               # the optimizer's default rule (sqrt for LAMB)
print("\n".join(big.reasons))
recipe = big.recipe
opt = LAMB(param_groups(model, weight_decay=0.01), lr=recipe.lr)
sched = SampleLR(opt, recipe.to_schedule())
monitor = NoiseMonitor(model)            # small batch: a micro-batch; big batch: the accumulated step
ema = EMA(model, horizon_samples=5_000)  # per-step decay follows the batch size

samples, micro = 0, 256
while samples < recipe.budget_samples:
    idx = torch.randint(0, len(X), (recipe.batch_size,))
    monitor.begin_step()
    for part in idx.split(micro):        # 4 micro-batches of 256: gradient accumulation
        with monitor.micro_batch(len(part)):
            loss = nn.functional.mse_loss(model(X[part]), Y[part], reduction="sum") / recipe.batch_size
            loss.backward()
    reading = monitor.end_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    samples += recipe.batch_size
    sched.step(samples=samples)
    ema.update(model, recipe.batch_size)

with torch.no_grad():
    final = nn.functional.mse_loss(model(X), Y).item()
    with ema.applied(model):
        averaged = nn.functional.mse_loss(model(X), Y).item()
print(f"B_simple = {monitor.b_simple:.0f}, train MSE {final:.3f} (EMA weights {averaged:.3f})")

"""Hand check of the default study's B_crit against the gradient noise scale B_simple.

Trains MNIST-1D's CNN as the default study's best cell at B = 64 does (SGD, momentum 0.9,
LR 0.1, seed 0) until 90% test accuracy, and every 50 steps measures
``B_simple = tr Σ / |G|²`` (McCandlish et al. 2018, eq. 2.9) from per-example gradients of
4000 training examples: ``tr Σ`` is the sum of the per-coordinate sample variances and
``|G|² = |ḡ|² − tr Σ / n`` is the unbiased squared norm of the mean gradient. Prints a table
and the median, to compare with ``results.json``'s ``b_crit`` (the noise monitor's B_simple
will replace this check once the trainer reports it).

    PYTHONPATH=. python benchmarks/study_bsimple_check.py [--batch-size 64 --lr 0.1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from bigbatch.workloads import load_workload


def b_simple(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(y), -1) for g in grads.values()], 1).double()
    n = flat.shape[0]
    trace_sigma = flat.var(0, unbiased=True).sum()
    g2 = flat.mean(0).pow(2).sum() - trace_sigma / n
    return float(trace_sigma / g2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    wl = load_workload("mnist1d")
    torch.manual_seed(0)
    model = wl.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sampler = wl.sampler(0)
    probe = torch.randperm(wl.dataset_size, generator=torch.Generator().manual_seed(1))[:4000]
    xp, yp = wl.x[probe], wl.y[probe]
    print(f"{'step':>6} {'accuracy':>9} {'B_simple':>9}")
    values, step = [], 0
    while True:
        if step % args.every == 0:
            acc = wl.evaluate(model, torch.device("cpu"))
            values.append(b_simple(model, xp, yp))
            print(f"{step:>6} {acc:>9.3f} {values[-1]:>9.1f}", flush=True)
            if acc >= args.target:
                break
        batch = wl.fetch(sampler.next(args.batch_size))
        loss, _ = wl.loss(model, batch)
        (loss / args.batch_size).backward()
        opt.step()
        opt.zero_grad()
        step += 1
    print(f"median B_simple over the run: {statistics.median(values):.1f}")


if __name__ == "__main__":
    main()

"""Plain functions behind NoiseMonitor: the step's sums → the estimator's inputs, and helpers.

On each rank the monitor sums ``Σ_j raw_j / (m_j c_j)²`` over its small-batch readings, where
``raw_j`` is the squared norm of what it read (``c_j``·Σ of ``m_j`` units' gradients, ``c_j`` the
loss scale), so each term is ``|G_{m_j}|²`` of McCandlish et al. 2018, App. A.1. Under the default
normalisation ``c = world/N`` is only known once ``N`` (the global count) is, so the factor
``(N/world)²`` is applied here, on the host, after the all-reduce.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bigbatch._checks import check_int_positive

__all__ = ["norm_dtype", "flat_norm", "scalar", "step_inputs", "split_batch", "is_ddp", "comm_hook"]


def norm_dtype(grad: torch.Tensor) -> torch.dtype:
    """The dtype a gradient's norm is reduced and summed in: fp64 for fp64, else fp32.

    bf16/fp16 are reduced in fp32 without a copy; fp32 of an fp64 tensor would be a narrowing,
    which ``vector_norm``/``_foreach_norm`` refuse.
    """
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def flat_norm(grad: torch.Tensor) -> torch.Tensor:
    """``‖grad‖₂`` as a 0-d tensor in :func:`norm_dtype` (inlined: this runs once per parameter
    per measured micro-batch)."""
    if grad.is_sparse:
        grad = grad.coalesce()._values()
    return torch.linalg.vector_norm(grad, dtype=torch.float64 if grad.dtype is torch.float64 else torch.float32)


def scalar(x: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-d fp32 tensor on ``device``; a Python number becomes a fill kernel, never a sync."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(x), device=device, dtype=torch.float32)


def step_inputs(vals: Sequence[float], host: Sequence[Any] | None, explicit: bool, n_groups: int,
                world_size: int) -> tuple[list[float], list[float], float, float] | None:
    """``(small |G_b|² per group, big |G_B|² per group, b, B)``, or None with one batch size only.

    ``vals``: ``[Σ small (G), (Σ 1/m_j, readings, N) if host is None, big raw (G)]``;
    ``host``: those three scalars when they never left the host (one process).
    """
    if host is None:
        small_sum, (inv_m_sum, k, n_global), big = vals[:n_groups], vals[n_groups:n_groups + 3], vals[n_groups + 3:]
    else:
        small_sum, big = list(vals[:n_groups]), list(vals[n_groups:])
        inv_m_sum, k, n_global = (float(v) for v in host)
    # The harmonic mean: E[mean_j |G_{m_j}|²] = |G|² + tr Σ · mean_j(1/m_j) for unequal m_j.
    b_small = k / inv_m_sum if k > 0 and inv_m_sum > 0 else math.inf
    if not b_small < n_global * (1 - 1e-9):
        return None
    f_small = 1.0 if explicit else (n_global / world_size) ** 2
    f_big = 1.0 / n_global**2 if explicit else 1.0
    return [s * f_small / k for s in small_sum], [b * f_big for b in big], b_small, float(n_global)


def split_batch(batch: Mapping[str, torch.Tensor], splits: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into ``splits`` pieces along the first (example) dimension; empty pieces dropped."""
    splits = check_int_positive("splits", splits)
    keys = list(batch)
    parts = [torch.tensor_split(batch[k], splits, dim=0) for k in keys]
    out = [{k: parts[j][i] for j, k in enumerate(keys)} for i in range(splits)]
    return [p for p in out if not keys or p[keys[0]].shape[0] > 0]


def is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def comm_hook(mode, bucket):  # no annotations: DDP checks them against dist.GradBucket
    """Read the rank-local bucket (before it is divided and all-reduced), then reduce as usual.

    ``mode``: the monitor's ``DDPMode`` (``read_bucket``, ``inner_hook``, ``inner_state``).
    """
    mode.read_bucket(bucket)
    return mode.inner_hook(mode.inner_state, bucket)

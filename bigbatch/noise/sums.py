"""Plain functions behind NoiseMonitor: the step's sums → the estimator's inputs, and helpers.

On each rank the monitor sums ``Σ_j raw_j / A_j²`` over its small-batch readings, where ``raw_j``
is the squared norm of what it read, a sum ``Σ_i a_i·S_i`` of micro-batches' gradients (``S_i``
summed over ``n_i`` units, ``a_i`` the loss scale) and ``A_j = Σ_i a_i n_i``, so each term is
``|G_{m_j}|²`` of McCandlish et al. 2018, App. A.1, at the effective batch
``m_j = A_j²/Σ_i a_i² n_i`` (:mod:`bigbatch.noise.context`). Under the default normalisation
``a = world/N`` is only known once ``N`` (the global count) is, so the factor ``(N/world)²`` is
applied here, on the host, after the all-reduce.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from bigbatch._checks import check_int_positive

__all__ = ["norm_dtype", "flat_norm", "scalar", "StepInputs", "step_inputs", "split_batch", "is_ddp", "comm_hook"]


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


class StepInputs(NamedTuple):
    """One step's inputs to the estimators, on the host (:func:`step_inputs`).

    ``small``/``big``: ``|G_b|²`` and ``|G_B|²`` per group, None when ``b_small`` is not below
    ``b_big`` (no estimate). ``b_big``: the effective big batch, ``(Σ a n)²/(Σ a² n)`` over the
    whole step (``units`` when every unit had the same loss factor). ``units``: the step's loss
    units on all ranks. ``stale``: ``|.grad|²`` before the step's first backward (all ranks).
    """

    small: list[float] | None
    big: list[float] | None
    b_small: float
    b_big: float
    units: float
    stale: float


def step_inputs(vals: Sequence[float], host: Sequence[Any] | None, explicit: bool, n_groups: int,
                world_size: int) -> StepInputs:
    """The estimators' inputs from the step's (all-reduced) sums.

    ``vals``: ``[Σ small (G), (scalars) if host is None, big raw (G)]``, the six scalars being
    ``Σ_j q_j/a_j²`` over the small readings, their number, the units ``N``, ``Σ a n`` and
    ``Σ a² n`` over all micro-batches (explicit loss scales only) and the stale ``|.grad|²``;
    ``host``: those scalars when they never left the host (one process).
    """
    if host is None:
        small_sum, scal, big = vals[:n_groups], vals[n_groups:n_groups + 6], vals[n_groups + 6:]
    else:
        small_sum, big, scal = list(vals[:n_groups]), list(vals[n_groups:]), host
    inv_m_sum, k, n_global, a_sum, q_sum, stale = (float(v) for v in scal)
    # The harmonic mean: E[mean_j |G_{m_j}|²] = |G|² + tr Σ · mean_j(1/m_j) for unequal m_j.
    b_small = k / inv_m_sum if k > 0 and inv_m_sum > 0 else math.inf
    if explicit:
        # The reduced gradient is Σ (a/world)·S over every rank's micro-batches: its |·|² over
        # (Σ a n/world)² reads |G|² + tr Σ/B with B = (Σ a n)²/(Σ a² n) <= N (Cauchy-Schwarz).
        b_big = a_sum * a_sum / q_sum if q_sum > 0 else math.nan
        if abs(b_big - n_global) <= 1e-6 * n_global:
            b_big = n_global  # equal factors: the difference is rounding
        f_small, f_big = 1.0, (world_size / a_sum) ** 2 if a_sum else math.nan
    else:  # the default c = world/N for every unit: the reduced gradient is the mean over all N
        b_big = n_global
        f_small, f_big = (n_global / world_size) ** 2, 1.0
    if not b_small < b_big * (1 - 1e-9):
        return StepInputs(None, None, b_small, float(b_big), float(n_global), stale)
    return StepInputs([s * f_small / k for s in small_sum], [b * f_big for b in big], b_small, float(b_big),
                      float(n_global), stale)


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

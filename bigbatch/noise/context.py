"""What a measurement mode sees of ``NoiseMonitor``'s step: one :class:`StepContext`.

The monitor writes it (``begin_step``, each ``micro_batch``, ``end_step``); the modes of
:mod:`bigbatch.noise.modes` read it and put their gradient hooks' readings into it. It is the
whole interface between the two, so the modes never see the monitor itself.

**Loss factors.** Let micro-batch ``j`` of a step (on one rank) hold ``n_j`` loss units with summed
gradient ``S_j``, its summed loss multiplied by ``a_j`` before ``backward`` (its ``loss_scale``).
What it adds to ``.grad`` is ``a_j·S_j``, and any sum of such parts, ``ĝ = Σ_j a_j·S_j`` over a set of
micro-batches, has ``E|ĝ|² = (Σ a_j n_j)²·|G|² + (Σ a_j² n_j)·tr Σ`` (per-unit gradients i.i.d. with
mean ``G`` and covariance ``Σ``). So ``|ĝ|²/(Σ a_j n_j)²`` reads ``|G|²`` plus ``tr Σ`` over an
*effective* batch ``(Σ a_j n_j)²/(Σ a_j² n_j)``: the count itself when the factors are equal, less
otherwise (Kish's effective sample size). :func:`unit_sums` gives the two sums of one micro-batch;
the context keeps their running totals over the step.

Core module: torch and the standard library only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from bigbatch.noise.sums import flat_norm, norm_dtype

__all__ = ["ParamGroups", "StepContext", "unit_sums"]


def unit_sums(count: Any, loss_scale: Any) -> tuple[Any, Any]:
    """``(a·n, a²·n)`` for a micro-batch of ``n = count`` units whose summed loss was scaled by
    ``a = loss_scale``; ``(n, n)`` when ``loss_scale`` is None (the monitor's default normalisation,
    one factor for every unit of the step: only ratios matter, so it counts as 1)."""
    if loss_scale is None:
        return count, count
    a = loss_scale * count
    return a, a * loss_scale


class ParamGroups:
    """The monitor's trainable parameters, each one's group of the per-group breakdown, and per-group sums."""

    def __init__(self, params: list[nn.Parameter], index: list[int], names: list[str]) -> None:
        self.params, self.index, self.names = params, index, names
        self.of = {id(p): g for p, g in zip(params, index)}
        self._idx_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def sum(self, sq: torch.Tensor, idx: tuple[int, ...]) -> torch.Tensor:
        """Per-group sums of ``sq`` (one entry per parameter, groups ``idx``) as a ``[G]`` tensor."""
        n_groups = len(self.names)
        if n_groups == 1:
            return sq.sum().reshape(1)
        key = (sq.device, idx)
        t = self._idx_cache.get(key)
        if t is None:  # built once per hook order; the order of a fixed graph repeats
            t = self._idx_cache[key] = torch.tensor(idx, dtype=torch.long).to(sq.device)
        return torch.zeros(n_groups, device=sq.device, dtype=sq.dtype).index_add_(0, t, sq)

    def sqnorms(self, grads: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Per-group squared norms of ``grads`` (one per parameter, None where there is none).

        Accumulated in float64 when any gradient is float64, else in float32; None if all are None.
        """
        buckets: dict[tuple[Any, Any], tuple[list[torch.Tensor], list[int]]] = {}
        for grad, g in zip(grads, self.index):
            if grad is not None:
                gr = grad.coalesce()._values() if grad.is_sparse else grad
                lst = buckets.setdefault((gr.device, gr.dtype), ([], []))
                lst[0].append(gr)
                lst[1].append(g)
        if not buckets:
            return None
        parts = [self.sum(torch.stack(torch._foreach_norm(gs, 2, dtype=norm_dtype(gs[0]))).square(), tuple(idx))
                 for gs, idx in buckets.values()]
        dev = parts[0].device
        return sum(p.to(dev) for p in parts)  # type: ignore[return-value]


class StepContext:
    """The step in progress on this rank, as the modes read it.

    ``groups``: the parameters and their groups. ``world_size``, ``process_group``: the ranks.
    ``measuring``: a measured step is in progress (begun, not ended, the monitor not closed).
    ``in_micro``: inside one of its ``micro_batch`` contexts. ``n_micro``: micro-batches completed.
    ``count``: loss units of the completed micro-batches; ``unit_sum``, ``unit_sqsum``: their
    ``Σ a_j n_j`` and ``Σ a_j² n_j`` (:func:`unit_sums`; kept on measured steps only).
    ``norms``, ``norm_groups``: the gradient norms the hooks read in the current micro-batch and
    the group of each.
    """

    __slots__ = ("groups", "world_size", "process_group", "measuring", "in_micro", "n_micro", "count",
                 "unit_sum", "unit_sqsum", "norms", "norm_groups")

    def __init__(self, groups: ParamGroups, world_size: int, process_group: Any) -> None:
        self.groups, self.world_size, self.process_group = groups, world_size, process_group
        self.measuring = self.in_micro = False
        self.norms: list[torch.Tensor] = []
        self.norm_groups: list[int] = []
        self.reset()

    def reset(self) -> None:
        """A new step: nothing read, nothing counted."""
        self.n_micro = 0
        self.count: Any = 0
        self.unit_sum: Any = 0
        self.unit_sqsum: Any = 0
        self.norms, self.norm_groups = [], []

    def on_grad(self, g: int, grad: torch.Tensor) -> None:
        """A gradient hook's reading (group ``g``): kept while a micro-batch is open."""
        # The hot path on measured steps: one norm launch per parameter per micro-batch. Not batched
        # into one _foreach_norm at the micro-batch's end: keeping `grad` alive until then would stop
        # AccumulateGrad from stealing it into .grad (it copies when others hold a reference).
        if self.in_micro:
            self.norms.append(flat_norm(grad))
            self.norm_groups.append(g)

    def make_hook(self, g: int) -> Callable[[torch.Tensor], None]:
        """A tensor hook that reads its gradient into group ``g``."""
        def hook(grad: torch.Tensor) -> None:
            self.on_grad(g, grad)

        return hook

"""Data parallelism for the trainer: DDP or FSDP2 (``fully_shard``), and their checkpoints.

Both are torch.distributed's own engines; this module only chooses the sharding units and
converts state to and from the single-file checkpoint format, so that a checkpoint written at
one world size (or with FSDP) loads at any other (or without it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from bigbatch.train.dist import DistInfo

__all__ = ["wrap_model", "gradient_sync", "full_model_state", "full_optimizer_state", "load_full_state", "load_full_model_state"]

STRATEGIES = ("ddp", "fsdp")


def _fsdp_units(model: nn.Module, workload: Any) -> list[nn.Module]:
    """Modules that get their own FSDP unit: the workload's choice, else every ModuleList item.

    Transformer blocks live in a ModuleList by convention (ours and nanoGPT's), and sharding per
    block is what lets FSDP overlap one block's all-gather with the previous block's compute.
    """
    pick = getattr(workload, "fsdp_units", None)
    if callable(pick):
        return list(pick(model))
    units: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            units.extend(c for c in m if any(True for _ in c.parameters()))
    return units


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, strategy: str, workload: Any = None) -> nn.Module:
    """DDP-wrap, or shard in place with FSDP2; a no-op on one process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The mesh of the training device: fully_shard's default mesh is CUDA's whenever a GPU is
    # present, which breaks a --device cpu run on a GPU machine.
    mesh = init_device_mesh(device.type, (info.world_size,))
    for unit in _fsdp_units(model, workload):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-batches."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on the CPU (a collective under FSDP: call on every rank)."""
    if not _is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed like an unsharded run (a collective under FSDP)."""
    if not _is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load an unsharded checkpoint into a plain or FSDP-sharded model (every rank calls this)."""
    if not _is_sharded(model):
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def load_full_model_state(model: nn.Module, model_sd: dict, *, from_rank0: bool = False) -> None:
    """Load unsharded weights into a plain or FSDP-sharded model (every rank calls this).

    ``from_rank0``: under FSDP only rank 0's ``model_sd`` is read (the others may pass ``{}``);
    it is broadcast and each rank keeps its shard.
    """
    if not _is_sharded(model):
        model.load_state_dict(model_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, model_sd, options=opts)

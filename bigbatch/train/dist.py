"""torch.distributed setup for torchrun launches (one process per GPU, or gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "pick_device", "shutdown_distributed"]

# Whether this module created the process group (then it also tears it down).
_OWNS_GROUP = False


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` → the local rank's GPU when CUDA is there, else CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
        if spec == "cuda":
            spec = f"cuda:{local_rank}"
    elif spec != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return torch.device(spec)


def init_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), pick_device(device_spec)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type != "cuda":
            # Gloo's eager full-mesh connect races a restarted peer (torchrun --max-restarts) and
            # gives up after three quick retries; lazy connections wait for the peer instead.
            os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
        global _OWNS_GROUP
        _OWNS_GROUP = True
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local), device


def shutdown_distributed(info: DistInfo) -> None:
    """End of a run: wait for every rank, then tear down the group if we created it.

    Without the barrier a rank that finishes first tears gloo down while its peer still completes
    the last collective, and the peer aborts ("terminate called without an active exception").
    """
    global _OWNS_GROUP
    if not info.enabled or not dist.is_initialized():
        return
    dist.barrier()
    if _OWNS_GROUP:
        dist.destroy_process_group()
        _OWNS_GROUP = False

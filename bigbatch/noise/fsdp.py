"""FSDP2 (``fully_shard``) support for ``NoiseMonitor``: each rank's gradient before the reduce-scatter.

Under FSDP2 a rank's own (local-batch) gradient exists only on the *unsharded* parameters, and
only until FSDP reduce-scatters it in its post-backward. ``fully_shard`` registers those
unsharded parameters on the modules in a forward pre-hook (its docstring: "A module forward
pre-hook on ``module`` all-gathers the parameters"; the unsharded parameters "will be like the
original parameters", plain tensors). That hook is prepended, so a forward pre-hook registered
afterwards on the same module sees the unsharded parameters, and a tensor hook put on each of them
(``Tensor.register_hook``) receives every micro-batch's gradient before it is accumulated — hence
before any reduce-scatter, and whether or not ``set_requires_gradient_sync(False)`` holds the
reduction back. Only public API is used: ``Module.register_forward_pre_hook``,
``Tensor.register_hook``, ``DTensor.to_local``. Checked with torch 2.11 and 2.13; if a torch
version stops registering the unsharded parameters, the monitor sees no gradient in a step that
ran a backward and raises with the torch version in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["UnshardedGradHooks", "check_sharded", "fsdp_units", "is_fsdp", "local_grads"]


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FSDPModule


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to (each holds one FSDP parameter group)."""
    kind = _fsdp_module_type()
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


def is_fsdp(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (``fully_shard`` on it or on a submodule)."""
    return bool(fsdp_units(model))


def check_sharded(named: list[tuple[str, nn.Parameter]], world_size: int) -> None:
    """Every trainable parameter is a DTensor sharded over a 1-D mesh of ``world_size`` ranks.

    Then the squared norm of the reduced gradient is the sum over ranks of the local shards'
    squared norms. (HSDP's 2-D mesh would count each replica's shard once per replica.)
    """
    from torch.distributed.tensor import DTensor

    for name, p in named:
        if not isinstance(p, DTensor):
            raise TypeError(f"mode='fsdp' needs every trainable parameter sharded by fully_shard; {name!r} is a plain tensor")
        mesh = p.device_mesh
        if mesh.ndim != 1 or mesh.size() != world_size or not p.placements[0].is_shard():
            raise ValueError(f"mode='fsdp' supports a 1-D FSDP mesh over all {world_size} ranks of the process group; "
                             f"{name!r} is placed {tuple(p.placements)} on a mesh of shape {tuple(mesh.shape)}")


class UnshardedGradHooks:
    """Tensor hooks on the unsharded parameters, put on during the forward of a measured step.

    ``slot_group`` maps ``(id(module), parameter name)`` to a group index (a tied parameter has
    one slot per owning module, all in its group); ``on_grad(group, grad)`` is called with each
    gradient before it is accumulated into ``.grad``.
    """

    def __init__(self, units: list[nn.Module], slot_group: dict[tuple[int, str], int],
                 on_grad: Callable[[int, torch.Tensor], None]) -> None:
        self.units, self.slot_group, self.on_grad = units, slot_group, on_grad
        self._module_handles: list[Any] = []
        self._tensor_handles: list[Any] = []
        self._hooked: dict[int, torch.Tensor] = {}  # strong refs: an id is not reused within a step
        self._pre_hook: Callable[..., None] | None = None

    @property
    def n_hooked(self) -> int:
        """Unsharded parameters hooked since ``attach``."""
        return len(self._hooked)

    def attach(self) -> None:
        self.detach()
        if self._pre_hook is None:
            # Kept out of a compiled graph (as FSDP's own hooks are); wrapped here, not at import,
            # because torch.compiler.disable imports dynamo (a second of start-up time).
            self._pre_hook = torch.compiler.disable(self._pre_forward)
        # Appended, so it runs after fully_shard's (prepended) hook has registered the unsharded parameters.
        self._module_handles = [u.register_forward_pre_hook(self._pre_hook) for u in self.units]

    def detach(self) -> None:
        for h in self._module_handles + self._tensor_handles:
            h.remove()
        self._module_handles, self._tensor_handles, self._hooked = [], [], {}

    def _pre_forward(self, unit: nn.Module, args: Any) -> None:
        from torch.distributed.tensor import DTensor

        for mod in unit.modules():
            for name, p in mod.named_parameters(recurse=False):
                # Nested units' parameters are still sharded (DTensor) here; their own hook takes them.
                if p is None or not p.requires_grad or isinstance(p, DTensor) or id(p) in self._hooked:
                    continue
                g = self.slot_group.get((id(mod), name))
                if g is None:
                    continue
                self._hooked[id(p)] = p
                self._tensor_handles.append(p.register_hook(self._make_hook(g)))

    def _make_hook(self, g: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.on_grad(g, grad)

        return hook


def local_grads(params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """The local shard of each parameter's (reduced, sharded) gradient; None where there is none."""
    return [None if p.grad is None else (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad) for p in params]

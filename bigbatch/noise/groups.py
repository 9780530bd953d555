"""Assigning parameters to named groups for the per-group noise-scale breakdown.

``|G|²`` and ``tr(Σ)`` are sums over coordinates, so per-group estimates add up to the whole;
``B_simple`` of a group says how noisy that part of the model's gradient is.
"""

from __future__ import annotations

from typing import Callable, Union

from torch import nn

__all__ = ["GroupSpec", "assign_groups"]

#: ``None`` (no breakdown), ``"module_type"`` (class name of the owning module: Linear,
#: Embedding, LayerNorm, ...), ``"parameter"`` (one group per named parameter), or a callable
#: ``(name, param) -> group name``.
GroupSpec = Union[None, str, Callable[[str, nn.Parameter], str]]


def assign_groups(model: nn.Module, groups: GroupSpec) -> tuple[list[nn.Parameter], list[int], list[str]]:
    """``(params, group index per param, group names)`` for the trainable parameters.

    Tied parameters appear once (under the first module that owns them).
    """
    named: list[tuple[str, str, nn.Parameter]] = []  # (param name, owner type, param)
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            named.append((f"{mod_name}.{p_name}" if mod_name else p_name, type(mod).__name__, p))
    if groups is None:
        keys = ["all"] * len(named)
    elif groups == "module_type":
        keys = [owner for _, owner, _ in named]
    elif groups == "parameter":
        keys = [name for name, _, _ in named]
    elif callable(groups):
        keys = [str(groups(name, p)) for name, _, p in named]
    else:
        raise ValueError(f"groups must be None, 'module_type', 'parameter' or a callable (name, param) -> str, got {groups!r}")
    order: dict[str, int] = {}
    index = [order.setdefault(k, len(order)) for k in keys]
    return [p for _, _, p in named], index, list(order)

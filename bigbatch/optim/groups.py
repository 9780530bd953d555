"""The param-group rule of the LARS/LAMB papers and the MLPerf references.

Biases and normalisation weights (by default: every tensor with ≤ 1 dimension) get no weight
decay and no layer-wise adaptation (trust ratio 1): their norms say little about a sensible
step size, and decaying a LayerNorm gain towards 0 hurts (You et al. 2019 §3; MLPerf BERT/ResNet
reference implementations).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Union

from torch import Tensor, nn

from bigbatch._checks import check_nonnegative

__all__ = ["param_groups"]

Rule = Union[Callable[[str, Tensor], bool], Iterable[str], None]


def _default_rule(name: str, p: Tensor) -> bool:
    return p.dim() <= 1


def _as_predicate(rule: Rule, what: str) -> Callable[[str, Tensor], bool]:
    if rule is None:
        return _default_rule
    if callable(rule):
        return rule
    if isinstance(rule, str):
        raise ValueError(f"{what} must be a callable (name, param) -> bool or a list of name patterns, got a string")
    patterns = list(rule)
    return lambda name, p: any(fnmatch.fnmatchcase(name, pat) or pat in name.split(".") for pat in patterns)


def _named(model: Any, patterns: bool) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs of a module, of named parameters, or of plain tensors (named by index)."""
    if isinstance(model, nn.Module):
        return list(model.named_parameters())
    if isinstance(model, Tensor) or isinstance(model, (str, bytes)) or not hasattr(model, "__iter__"):
        raise ValueError(
            "model must be an nn.Module, an iterable of (name, tensor) pairs (named_parameters()) or of "
            f"tensors, got {type(model).__name__}"
        )
    items = list(model)
    if all(isinstance(x, Tensor) for x in items):
        if patterns:
            raise ValueError("name patterns need names: pass the model or model.named_parameters(), not bare tensors")
        return [(str(i), p) for i, p in enumerate(items)]
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], Tensor) for x in items):
        return items
    bad = next((x for x in items if not isinstance(x, (Tensor, tuple))), items[0])
    raise ValueError(
        "model must be an nn.Module, an iterable of (name, tensor) pairs or of tensors (not a mix); "
        f"got an element of type {type(bad).__name__}"
    )


def param_groups(
    model: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    weight_decay: float,
    *,
    no_decay: Rule = None,
    no_adapt: Rule = None,
    exclude: Rule = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into groups by (weight decay, adaptation).

    Args:
        model: the module whose ``named_parameters()`` are grouped, or those pairs themselves, or
            plain tensors (named ``"0"``, ``"1"``, ... by position; name patterns then refused).
        weight_decay: decay (≥ 0) for the decayed group; the excluded ones get 0.
        no_decay: which parameters get no weight decay: a predicate ``(name, param) -> bool`` or
            name patterns (fnmatch, or an exact dotted component such as ``"bias"``).
            Default: tensors with ≤ 1 dimension.
        no_adapt: which parameters get ``adapt=False`` (trust ratio 1); same forms and default.
        exclude: sets both ``no_decay`` and ``no_adapt`` (one name for both).

    Returns:
        Non-empty groups ``{"params", "weight_decay", "adapt", "names"}`` in a stable order.
    """
    check_nonnegative("weight_decay", weight_decay)
    if exclude is not None:
        if no_decay is not None or no_adapt is not None:
            raise ValueError("pass exclude, or no_decay/no_adapt, not both")
        no_decay = no_adapt = exclude
    nd, na = _as_predicate(no_decay, "no_decay"), _as_predicate(no_adapt, "no_adapt")
    buckets: dict[tuple[bool, bool], dict[str, Any]] = {}
    uses_patterns = any(r is not None and not callable(r) for r in (no_decay, no_adapt))
    for name, p in _named(model, uses_patterns):
        if not p.requires_grad:
            continue
        key = (not nd(name, p), not na(name, p))
        g = buckets.setdefault(
            key, {"params": [], "weight_decay": weight_decay if key[0] else 0.0, "adapt": key[1], "names": []}
        )
        g["params"].append(p)
        g["names"].append(name)
    return [buckets[k] for k in sorted(buckets, reverse=True)]

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


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: Rule = None,
    no_adapt: Rule = None,
    exclude: Rule = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into groups by (weight decay, adaptation).

    Args:
        model: the module whose ``named_parameters()`` are grouped.
        weight_decay: decay (≥ 0) for the decayed group; the excluded ones get 0.
        no_decay: which parameters get no weight decay: a predicate ``(name, param) -> bool`` or
            name patterns (fnmatch, or an exact dotted component such as ``"bias"``).
            Default: tensors with ≤ 1 dimension.
        no_adapt: which parameters get ``adapt=False`` (trust ratio 1); same forms and default.
        exclude: sets both ``no_decay`` and ``no_adapt`` (DESIGN.md's spelling).

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
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (not nd(name, p), not na(name, p))
        g = buckets.setdefault(
            key, {"params": [], "weight_decay": weight_decay if key[0] else 0.0, "adapt": key[1], "names": []}
        )
        g["params"].append(p)
        g["names"].append(name)
    return [buckets[k] for k in sorted(buckets, reverse=True)]

"""One registry of optimizers: ``create_optimizer(name, model_or_params, lr, ...)``.

Unknown names raise ``ValueError`` listing the valid ones and the closest match, as timm's
``_optim_factory.py`` does. Each entry is a frozen record; variants are just defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bigbatch._checks import check_choice, check_nonnegative, check_positive

__all__ = ["OptimizerInfo", "OPTIMIZERS", "create_optimizer", "register_optimizer"]


@dataclass(frozen=True, slots=True)
class OptimizerInfo:
    """A registry record: how to build the optimizer and which defaults it has."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


OPTIMIZERS: dict[str, OptimizerInfo] = {}


def register_optimizer(info: OptimizerInfo) -> OptimizerInfo:
    OPTIMIZERS[info.name] = info
    return info


register_optimizer(
    OptimizerInfo("sgd", torch.optim.SGD, {"momentum": 0.9}, "SGD with (heavy-ball) momentum")
)
register_optimizer(
    OptimizerInfo("adamw", torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8}, "AdamW (Loshchilov & Hutter)")
)


def _params(model_or_params: nn.Module | Iterable) -> Iterable:
    if isinstance(model_or_params, nn.Module):
        return model_or_params.parameters()
    return model_or_params


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable,
    lr: float,
    weight_decay: float = 0.0,
    **extra: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` with the registry's defaults overridden by ``extra``."""
    check_choice("optimizer", name, OPTIMIZERS)
    check_positive("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    info = OPTIMIZERS[name]
    kwargs = {**info.defaults, **extra}
    return info.build(_params(model_or_params), lr=lr, weight_decay=weight_decay, **kwargs)

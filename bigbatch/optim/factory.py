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
from bigbatch.optim.groups import param_groups
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.merit import MERIT

__all__ = ["OptimizerInfo", "OPTIMIZERS", "create_optimizer", "register_optimizer"]


@dataclass(frozen=True, slots=True)
class OptimizerInfo:
    """A registry record: how to build the optimizer and which defaults it has."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    layerwise: bool = False
    """True: a model passed to ``create_optimizer`` is split by :func:`param_groups` (1-D tensors
    get no weight decay and no adaptation), as the LARS/LAMB papers prescribe."""
    paper: str = ""


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


register_optimizer(
    OptimizerInfo(
        "lars", LARS, {"momentum": 0.9, "trust_coefficient": 0.001, "eps": 1e-8},
        "LARS: layer-wise trust ratio on SGD with momentum", layerwise=True,
        paper="You, Gitman, Ginsburg 2017 (arXiv:1708.03888)",
    )
)
register_optimizer(
    OptimizerInfo(
        "lamb", LAMB, {"betas": (0.9, 0.999), "eps": 1e-6},
        "LAMB: layer-wise trust ratio on Adam", layerwise=True,
        paper="You et al. 2019 (arXiv:1904.00962), Algorithm 2",
    )
)
register_optimizer(
    OptimizerInfo(
        "merit", MERIT, {"betas": (0.9, 0.999), "eps": 1e-6},
        "MERIT: element-wise max-norm trust ratio on Adam", layerwise=True,
        paper="Luo et al. 2025 (ICML), Algorithm 1",
    )
)


def _params(model_or_params: nn.Module | Iterable, info: OptimizerInfo, weight_decay: float) -> Iterable:
    if isinstance(model_or_params, nn.Module):
        if info.layerwise:
            groups = param_groups(model_or_params, weight_decay)
            for g in groups:
                g.pop("names")  # keep state_dicts free of non-tensor lists the trainer does not need
            return groups
        return model_or_params.parameters()
    return model_or_params


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable,
    lr: float,
    weight_decay: float = 0.0,
    **extra: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` with the registry's defaults overridden by ``extra``.

    For the layer-wise optimizers (lars, lamb, merit) a model is split by
    :func:`bigbatch.optim.param_groups`; pass parameters or your own groups to opt out.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    check_positive("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    info = OPTIMIZERS[name]
    kwargs = {**info.defaults, **extra}
    return info.build(_params(model_or_params, info, weight_decay), lr=lr, weight_decay=weight_decay, **kwargs)

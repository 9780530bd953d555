"""One registry of optimizers, owner of every per-optimizer fact.

Each entry is a frozen :class:`OptimizerInfo`: how to build the optimizer, its *family*
(``"sgd"``: takes ``momentum``; ``"adam"``: takes ``betas`` and ``eps``; ``"other"``: neither),
the hyperparameters it takes with their defaults, its default LR scaling rule, whether it has a
multi-tensor (``foreach=``) and a fused (``fused=``) path, and whether a model is split by
:func:`param_groups` (the layer-wise optimizers). The scaling rules, the :class:`Recipe` and the
trainer read these facts here instead of keeping their own tables. Variants are just defaults, as
in timm's ``_optim_factory.py``; an unknown name raises ``ValueError`` naming the closest valid
names.

Optimizers from outside the package, three ways:

* ``register_optimizer(OptimizerInfo(...))`` or ``register_optimizer("pkg.mod:MyOpt")``;
* a ``module:Class`` string wherever a name is taken (``create_optimizer("pkg.mod:MyOpt", ...)``,
  ``Recipe(optimizer="pkg.mod:MyOpt")``, ``bigbatch train --optimizer pkg.mod:MyOpt``): imported
  and registered under that string on first use;
* an entry point in the ``bigbatch.optimizers`` group (``name = "pkg.mod:MyOpt"``), looked up
  when a plain name is not registered.

The target of a ``module:attr`` spec is an :class:`OptimizerInfo`, or an optimizer class. A class
may carry its record as a class attribute ``optimizer_info``; otherwise the record is read from
its constructor's signature: family ``"adam"`` if it takes ``betas``, ``"sgd"`` if it takes
``momentum`` (else ``"other"``), the signature's defaults for those, the family's default rule
(sgd → linear, adam → adam-sqrt, other → none given), ``foreach``/``fused`` if it takes them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from bigbatch._checks import check_choice, check_nonnegative, check_positive, closest
from bigbatch.optim.groups import param_groups
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.merit import MERIT
from bigbatch.rules import RULES

__all__ = [
    "FAMILIES",
    "DECAY_FORMS",
    "OptimizerInfo",
    "OPTIMIZERS",
    "ENTRY_POINT_GROUP",
    "create_optimizer",
    "optimizer_info",
    "optimizer_names",
    "register_optimizer",
]

FAMILIES: dict[str, tuple[str, ...]] = {"sgd": ("momentum",), "adam": ("betas", "eps"), "other": ()}
"""Family → the hyperparameters a scaling rule may set on optimizers of that family."""

_FAMILY_RULE: dict[str, str | None] = {"sgd": "linear", "adam": "adam-sqrt", "other": None}
DECAY_FORMS: dict[str, str] = {
    "decoupled": "decoupled from the moments and multiplied by the LR: w <- w - lr*wd*w each step (torch AdamW)",
    "decoupled-trust": "decoupled from the moments, inside the update the trust ratio scales: w <- w - lr*r*(u + wd*w)",
    "l2": "L2: wd*w added to the gradient before the moments or the momentum buffer",
    "unknown": "not declared by its registry record",
}
"""How an optimizer applies ``weight_decay`` (``OptimizerInfo.decay_form``); the weight-decay timescale
rule (:func:`bigbatch.scaling.rescale`, ``weight_decay_rule="timescale"``) moves only the first two."""
ENTRY_POINT_GROUP = "bigbatch.optimizers"


@dataclass(frozen=True, slots=True)
class OptimizerInfo:
    """A registry record: how to build the optimizer and the facts other modules need about it."""

    name: str
    """The registry key (``--optimizer``, ``Recipe.optimizer``)."""
    build: Callable[..., torch.optim.Optimizer]
    """Called as ``build(params, lr=..., weight_decay=..., **defaults, **extra)``."""
    family: str
    """``"sgd"`` (takes ``momentum``), ``"adam"`` (takes ``betas``, ``eps``) or ``"other"``."""
    default_rule: str | None
    """The LR scaling rule used when none is given (None: a rule must be given)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Constructor defaults the registry passes (the family's hyperparameters among them)."""
    description: str = ""
    layerwise: bool = False
    """True: a model passed to ``create_optimizer`` is split by :func:`param_groups` (1-D tensors
    get no weight decay and no adaptation), as the LARS/LAMB papers prescribe."""
    foreach: bool = False
    """It has a multi-tensor path, chosen with ``foreach=``."""
    fused: bool = False
    """It has a fused path, chosen with ``fused=``."""
    paper: str = ""
    decay_form: str = "unknown"
    """How it applies ``weight_decay``: a key of :data:`DECAY_FORMS` (``decoupled``, ``decoupled-trust``,
    ``l2``, ``unknown``)."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"optimizer name must be a non-empty string, got {self.name!r}")
        if not callable(self.build):
            raise ValueError(f"optimizer {self.name!r}: build must be callable, got {self.build!r}")
        check_choice("optimizer family", self.family, FAMILIES)
        check_choice("decay_form", self.decay_form, DECAY_FORMS)
        # A read-only copy: the record is frozen, its defaults must not change under it either.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def hparams(self) -> tuple[str, ...]:
        """The hyperparameters of its family that a scaling rule may set (momentum, or betas/eps)."""
        return FAMILIES[self.family]

    def takes(self, key: str) -> bool:
        """Whether ``key`` (momentum, betas, eps) is one of its family's hyperparameters."""
        return key in self.hparams

    def default(self, key: str) -> Any:
        """The default of hyperparameter ``key`` (None when the registry does not set one)."""
        return self.defaults.get(key)

    @property
    def fused_spec(self) -> Any:
        """The :class:`~bigbatch.optim._base.FusedSpec` of a trust-ratio optimizer with fused kernels
        (its class's ``fused_spec``), else None: the entries the fused kernel tests run over."""
        return getattr(self.build, "fused_spec", None) if self.fused else None


OPTIMIZERS: dict[str, OptimizerInfo] = {}
"""Name → record. Read it through :func:`optimizer_info` (which also resolves ``module:Class``)."""


def _add(info: OptimizerInfo) -> OptimizerInfo:
    OPTIMIZERS[info.name] = info
    return info


_add(OptimizerInfo(
    "sgd", torch.optim.SGD, "sgd", "linear", {"momentum": 0.9}, "SGD with (heavy-ball) momentum",
    foreach=True, fused=True, paper="Goyal et al. 2017 (linear scaling rule)",
    decay_form="l2",
))
_add(OptimizerInfo(
    "adam", torch.optim.Adam, "adam", "adam-sqrt", {"betas": (0.9, 0.999), "eps": 1e-8}, "Adam (L2 weight decay)",
    foreach=True, fused=True, paper="Kingma & Ba 2015",
    decay_form="l2",
))
_add(OptimizerInfo(
    "adamw", torch.optim.AdamW, "adam", "adam-sqrt", {"betas": (0.9, 0.999), "eps": 1e-8},
    "AdamW (decoupled weight decay)", foreach=True, fused=True, paper="Loshchilov & Hutter 2019",
    decay_form="decoupled",
))
_add(OptimizerInfo(
    "lars", LARS, "sgd", "legw", {"momentum": 0.9, "trust_coefficient": 0.001, "eps": 1e-8},
    "LARS: layer-wise trust ratio on SGD with momentum", layerwise=True, foreach=True, fused=True,
    paper="You, Gitman, Ginsburg 2017 (arXiv:1708.03888)",
    decay_form="l2",
))
_add(OptimizerInfo(
    "lamb", LAMB, "adam", "sqrt", {"betas": (0.9, 0.999), "eps": 1e-6},
    "LAMB: layer-wise trust ratio on Adam", layerwise=True, foreach=True, fused=True,
    paper="You et al. 2019 (arXiv:1904.00962), Algorithm 2",
    decay_form="decoupled-trust",
))
_add(OptimizerInfo(
    "merit", MERIT, "adam", "sqrt", {"betas": (0.9, 0.999), "eps": 1e-6},
    "MERIT: element-wise max-norm trust ratio on Adam", layerwise=True, foreach=True, fused=True,
    paper="Luo et al. 2025 (ICML), Algorithm 1",
    decay_form="decoupled-trust",
))


def optimizer_names() -> list[str]:
    """The registered names (built-in first, then in registration order)."""
    return list(OPTIMIZERS)


def _unknown(name: Any) -> ValueError:
    names = optimizer_names()
    near = closest(str(name), names)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return ValueError(
        f"unknown optimizer {name!r}{hint}; valid: {', '.join(names)}, or 'module:Class' for your own"
    )


def _is_missing(e: ModuleNotFoundError, mod_name: str) -> bool:
    """True when ``e`` says ``mod_name`` itself (or a parent package) is missing."""
    return e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + "."))


def _import_spec(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"optimizer {spec!r}: a spec is 'module:Class' (both parts non-empty)")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if not _is_missing(e, mod_name):
            raise  # a missing import *inside* the user's module: keep its traceback
        # As `python -m` does, a module in the current directory can be named.
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise ValueError(f"optimizer {spec!r}: module {mod_name!r} cannot be imported ({e})") from None
        sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e2:
            if not _is_missing(e2, mod_name):
                raise
            sys.path.remove(cwd)
            raise ValueError(f"optimizer {spec!r}: module {mod_name!r} cannot be imported ({e2})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"optimizer {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _info_from(obj: Any, name: str) -> OptimizerInfo:
    """The record for ``obj`` (an OptimizerInfo or an optimizer class), registered as ``name``."""
    if isinstance(obj, OptimizerInfo):
        return dataclasses.replace(obj, name=name)
    own = getattr(obj, "optimizer_info", None)
    if isinstance(own, OptimizerInfo):
        return dataclasses.replace(own, name=name)
    if not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
        raise ValueError(
            f"optimizer {name!r} must name a torch.optim.Optimizer subclass or an OptimizerInfo, "
            f"got {type(obj).__name__}"
        )
    params = inspect.signature(obj).parameters
    family = "adam" if "betas" in params else "sgd" if "momentum" in params else "other"
    defaults = {
        k: params[k].default for k in FAMILIES[family]
        if k in params and params[k].default is not inspect.Parameter.empty
    }
    doc = (inspect.getdoc(obj) or "").strip().splitlines()
    return OptimizerInfo(
        name, obj, family, _FAMILY_RULE[family], defaults, doc[0] if doc else "",
        foreach="foreach" in params, fused="fused" in params,
    )


def register_optimizer(info: OptimizerInfo | str, *, name: str | None = None, overwrite: bool = False) -> OptimizerInfo:
    """Add an optimizer to the registry and return its record.

    ``info`` is an :class:`OptimizerInfo`, or a ``"module:Class"`` string (read as described in
    the module docstring). ``name`` overrides the key it is registered under (default: the
    record's name, or the spec string itself). A name that is taken by another record is an
    error unless ``overwrite=True`` (replacing ``sgd`` by accident would change every run).
    """
    if isinstance(info, str):
        info = _info_from(_import_spec(info), name or info)
    elif not isinstance(info, OptimizerInfo):
        raise ValueError(f"register_optimizer takes an OptimizerInfo or a 'module:Class' string, got {type(info).__name__}")
    elif name is not None:
        info = dataclasses.replace(info, name=name)
    if info.default_rule is not None:
        check_choice("default_rule", info.default_rule, RULES)
    old = OPTIMIZERS.get(info.name)
    if old is not None and old != info and not overwrite:
        raise ValueError(f"optimizer {info.name!r} is already registered ({old.description or old.build!r}); "
                         "pass overwrite=True to replace it")
    return _add(info)


def _entry_point(name: str) -> Any | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep
    return None


def optimizer_info(name: str) -> OptimizerInfo:
    """The record of optimizer ``name``: a registered name, a ``module:Class`` spec (imported and
    registered on first use) or a ``bigbatch.optimizers`` entry point. Unknown: ``ValueError``
    listing the valid names and the closest ones."""
    if not isinstance(name, str):
        raise ValueError(f"optimizer must be a name (str), got {type(name).__name__}")
    info = OPTIMIZERS.get(name)
    if info is not None:
        return info
    if ":" in name:
        return register_optimizer(name)
    ep = _entry_point(name)
    if ep is not None:
        return register_optimizer(_info_from(ep.load(), name))
    raise _unknown(name)


def _params(model_or_params: nn.Module | Iterable, info: OptimizerInfo, weight_decay: float) -> Iterable:
    if isinstance(model_or_params, nn.Module):
        if info.layerwise:
            groups = param_groups(model_or_params, weight_decay)
            for g in groups:
                g.pop("names")  # keep state_dicts free of non-tensor lists the trainer does not need
            return groups
        return model_or_params.parameters()
    if isinstance(model_or_params, torch.Tensor):
        raise ValueError("model_or_params must be a model, an iterable of parameters or of param groups; "
                         "got a single tensor (wrap it in a list)")
    items = list(model_or_params)
    # named_parameters() pairs are accepted too (the name is dropped: torch.optim takes tensors).
    return [p for _, p in items] if items and all(isinstance(x, tuple) and len(x) == 2 for x in items) else items


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
    A family hyperparameter the optimizer does not take (``momentum`` for an Adam-family one,
    ``betas``/``eps`` for an SGD-family one) and ``fused=True``/``foreach=True`` on an optimizer
    without that path are errors, not silently dropped.
    """
    info = optimizer_info(name)
    check_positive("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    for key in ("momentum", "betas"):
        if key in extra and not info.takes(key) and key not in info.defaults:
            takes = ", ".join(info.hparams) or "neither momentum nor betas"
            raise ValueError(f"optimizer {name!r} ({info.family} family) takes no {key} (it takes {takes})")
    for path in ("foreach", "fused"):
        if extra.get(path) and not getattr(info, path):
            raise ValueError(f"optimizer {name!r} has no {path} path; drop {path}=True")
    kwargs = {**info.defaults, **extra}
    return info.build(_params(model_or_params, info, weight_decay), lr=lr, weight_decay=weight_decay, **kwargs)

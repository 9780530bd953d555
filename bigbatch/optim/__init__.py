"""Optimizers for large batches (LARS, LAMB, MERIT), the param-group rule, and the registry
that builds them by name and owns their per-optimizer facts (family, hyperparameters, default
scaling rule, foreach/fused paths). Fused CUDA kernels live in ``bigbatch.optim._fused`` and are
imported only when a fused step runs."""

from bigbatch.optim.factory import (
    ENTRY_POINT_GROUP,
    FAMILIES,
    OPTIMIZERS,
    OptimizerInfo,
    create_optimizer,
    optimizer_info,
    optimizer_names,
    register_optimizer,
)
from bigbatch.optim.groups import param_groups
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.merit import MERIT

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "LAMB",
    "LARS",
    "MERIT",
    "OPTIMIZERS",
    "OptimizerInfo",
    "create_optimizer",
    "optimizer_info",
    "optimizer_names",
    "param_groups",
    "register_optimizer",
]

"""Optimizers for large batches (LARS, LAMB, MERIT), the param-group rule, and the registry
that builds them by name. Fused CUDA kernels live in ``bigbatch.optim._fused`` and are imported
only when a fused step runs."""

from bigbatch.optim.factory import OPTIMIZERS, OptimizerInfo, create_optimizer, register_optimizer
from bigbatch.optim.groups import param_groups
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.merit import MERIT

__all__ = [
    "LAMB",
    "LARS",
    "MERIT",
    "OPTIMIZERS",
    "OptimizerInfo",
    "create_optimizer",
    "param_groups",
    "register_optimizer",
]

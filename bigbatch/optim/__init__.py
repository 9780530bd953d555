"""Optimizers for large batches and the registry that builds them by name."""

from bigbatch.optim.factory import OPTIMIZERS, OptimizerInfo, create_optimizer, register_optimizer

__all__ = ["OPTIMIZERS", "OptimizerInfo", "create_optimizer", "register_optimizer"]

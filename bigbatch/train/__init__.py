"""The reference trainer (a client of the core): one loop for CPU, one GPU and torchrun DDP."""

from typing import Any

from bigbatch.train.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "BatchPlan", "plan_batch", "train", "RunState", "FORMAT_VERSION"]

_LAZY = {"TrainResult": "loop", "train": "loop", "BatchPlan": "plan", "plan_batch": "plan",
         "RunState": "state", "FORMAT_VERSION": "state"}


def __getattr__(name: str) -> Any:
    # The loop imports torch (seconds); TrainConfig alone must not, so that the CLI can build
    # `bigbatch train`'s flags from it without slowing down every other command.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"bigbatch.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'bigbatch.train' has no attribute {name!r}")

"""The reference trainer (a client of the core): one loop for CPU, one GPU and torchrun DDP."""

from bigbatch.train.config import TrainConfig
from bigbatch.train.loop import BatchPlan, TrainResult, plan_batch, train

__all__ = ["TrainConfig", "TrainResult", "BatchPlan", "plan_batch", "train"]

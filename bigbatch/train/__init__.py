"""The reference trainer (a client of the core): one loop for CPU, one GPU and torchrun DDP."""

from bigbatch.train.config import TrainConfig
from bigbatch.train.loop import TrainResult, train
from bigbatch.train.plan import BatchPlan, plan_batch
from bigbatch.train.state import FORMAT_VERSION, RunState

__all__ = ["TrainConfig", "TrainResult", "BatchPlan", "plan_batch", "train", "RunState", "FORMAT_VERSION"]

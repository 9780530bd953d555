"""Gradient noise scale (McCandlish et al. 2018): the estimator and the training monitor.

``NoiseScale`` is a small object fed numbers (squared gradient norms at two batch sizes);
``NoiseMonitor`` gets those numbers from a training loop that calls it explicitly.
Core module: torch and the standard library only.
"""

from bigbatch.noise.estimator import NoiseScale, unbiased_estimates
from bigbatch.noise.groups import GroupSpec, assign_groups
from bigbatch.noise.modes import select_mode
from bigbatch.noise.monitor import NoiseMonitor, split_batch
from bigbatch.noise.reading import NoiseReading

__all__ = ["NoiseScale", "unbiased_estimates", "NoiseMonitor", "NoiseReading", "split_batch", "select_mode", "GroupSpec", "assign_groups"]

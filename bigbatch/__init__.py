"""bigbatch: large-batch training for PyTorch.

Core modules (``bigbatch.optim``, ``schedules``, ``scaling``, ``noise``, ``adaptive``,
``averaging``, ``data``) depend on torch and numpy only; the trainer, the study and the CLI
are clients of the core. docs/design.md describes the layers, the units and where each algorithm lives.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

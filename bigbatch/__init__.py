"""bigbatch: large-batch training for PyTorch.

Core modules (``bigbatch.optim``, ``schedules``, ``scaling``, ``noise``, ``adaptive``,
``averaging``, ``data``) depend on torch and numpy only; the trainer, the study and the CLI
are clients of the core. See DESIGN.md for the architecture and the math.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

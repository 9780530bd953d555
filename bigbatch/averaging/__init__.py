"""Averages of model weights: checkpoint averaging and a weight EMA whose decay is per sample.

* ``bigbatch.averaging.checkpoints``: ``average_checkpoints``, the uniform average of the last N
  checkpoints (Popel & Bojar 2018, §4.10), streamed one checkpoint at a time, and the careful
  reading and writing of checkpoint files it needs.
* ``bigbatch.averaging.ema``: ``EMA``, θ̄ ← ρ^B θ̄ + (1 − ρ^B) θ after a step of B samples
  (Busbridge et al. 2023, Def. 1.1), so the averaging window is fixed in samples.

Both are importable from here (``from bigbatch.averaging import EMA, average_checkpoints``).
Core package: torch, numpy and the standard library only.
"""

from __future__ import annotations

from bigbatch.averaging.checkpoints import (
    CheckpointError,
    average_checkpoints,
    check_output_file,
    extract_state_dict,
    last_checkpoints,
    last_loadable_checkpoints,
    load_model_state,
    save_atomic,
)
from bigbatch.averaging.ema import EMA

__all__ = [
    "EMA",
    "CheckpointError",
    "average_checkpoints",
    "check_output_file",
    "extract_state_dict",
    "last_checkpoints",
    "last_loadable_checkpoints",
    "load_model_state",
    "save_atomic",
]

"""On-disk cache for generated data sets, under the user cache directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["cache_dir", "cached"]


def cache_dir() -> Path:
    """``$BIGBATCH_CACHE`` or ``$XDG_CACHE_HOME/bigbatch`` or ``~/.cache/bigbatch``."""
    env = os.environ.get("BIGBATCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bigbatch"


def cached(kind: str, args: dict[str, Any], build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load ``kind`` built with ``args`` from the cache, or build and store it atomically."""
    key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"{kind}-{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a torn or foreign file: rebuild it
            pass
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data

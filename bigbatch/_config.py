"""Reading the tool's config dataclasses (TrainConfig, StudyConfig) from dicts and TOML files.

One place for the two checks every config file needs: unknown keys are named (with the valid
ones), and a file that is not TOML becomes a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["config_from_dict", "read_toml"]

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)`` after refusing keys that are not fields of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} config field(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return cls(**d)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file's table; a syntax error names the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path} is not valid TOML: {e}") from None

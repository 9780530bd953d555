"""The helpers every config dataclass of the tool shares (TrainConfig, StudyConfig, ScaleConfig).

:class:`ConfigMixin` gives a config dataclass ``to_dict``/``from_dict``/``from_toml``/``replace``
once, with the two checks every config file needs: unknown keys are named (with the valid
ones), and a file that is not TOML becomes a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigMixin", "config_from_dict", "read_toml"]

T = TypeVar("T")
C = TypeVar("C", bound="ConfigMixin")


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


class ConfigMixin:
    """``to_dict``/``from_dict``/``from_toml``/``replace`` for a config dataclass.

    The config's name in error messages is the class name without ``Config``, lower-cased
    (``TrainConfig`` → "train"). Empty ``__slots__`` keeps ``slots=True`` subclasses slotted.
    """

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field, recursively copied (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config with the fields in ``d``; an unknown key is a ``ValueError`` listing the valid ones."""
        return config_from_dict(cls, d, cls.__name__.removesuffix("Config").lower())

    @classmethod
    def from_toml(cls: type[C], path: str | Path) -> C:
        """The config read from a TOML file whose top-level keys are field names."""
        return cls.from_dict(read_toml(path))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

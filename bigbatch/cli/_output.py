"""Output files of CLI commands: a path that cannot be written is a one-line error naming the flag.

Checked before the work starts (so a typo in ``--out`` does not cost a plot or a study), and
the write itself is wrapped too, since a check cannot foresee every failure (disk full, a
directory made read-only meanwhile).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["check_output_file", "writing"]


def check_output_file(flag: str, path: Path) -> Path:
    """``path`` after making its parent directory; ``ValueError`` naming ``flag`` if it cannot be written."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create the directory {parent} ({_reason(e)})") from None
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the directory {parent} is not writable")
    return path


@contextlib.contextmanager
def writing(flag: str, path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a one-line ``ValueError`` naming ``flag``."""
    try:
        yield
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write ({_reason(e)})") from None


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__

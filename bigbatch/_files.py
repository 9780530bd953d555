"""Writing files without losing or half-writing anything: one home for the checks and the atomic writes.

``check_output_file`` is run before the work starts, so that a typo in an output path does not
cost a plot, a study or an average; ``writing`` turns a failure of the write itself (disk full,
a directory made read-only meanwhile) into the same one-line ``ValueError``; ``save_atomic`` and
``write_json_atomic`` write beside the target and rename over it, so a reader never sees a
partial file and a failed write leaves no temporary file behind.
Core module: torch and the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["check_output_file", "writing", "save_atomic", "write_json_atomic"]


def check_output_file(path: str | Path, name: str = "path") -> Path:
    """``path`` as a ``Path`` with its parent directory made, or a ``ValueError`` naming ``name``.

    ``path`` must not be a directory; its nearest existing ancestor must be a directory, and
    the parent must be writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a directory; give a file path")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{name} {path}: {existing} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{name} {path}: cannot create the directory {parent} ({_reason(e)})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: the directory {parent} is not writable")
    return path


@contextlib.contextmanager
def writing(name: str, path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a one-line ``ValueError`` naming ``name``."""
    try:
        yield
    except OSError as e:
        raise ValueError(f"{name} {path}: cannot write ({_reason(e)})") from None


def _atomic(path: str | Path, name: str, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise ValueError(f"{name} {path} cannot be written: {_reason(e)}") from None
    except BaseException:
        _remove(tmp)
        raise


def save_atomic(obj: Any, path: str | Path, *, name: str = "path") -> None:
    """``torch.save(obj, path)`` so that a reader never sees a partial file and no trace is left on failure.

    Writes ``.<file>.tmp<pid>`` beside ``path`` and renames it over ``path``; on any failure
    (disk full, permission, interrupt) the temporary file is removed. Errors of the file
    system become a ``ValueError`` naming ``name`` and ``path``.
    """
    _atomic(path, name, lambda tmp: torch.save(obj, tmp))


def write_json_atomic(obj: Any, path: str | Path, *, name: str = "path", default: Callable[[Any], Any] | None = None) -> None:
    """``obj`` as indented JSON to ``path``, atomically (as :func:`save_atomic`)."""
    _atomic(path, name, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n"))


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # never let the clean-up hide the error that caused it
        tmp.unlink(missing_ok=True)


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__

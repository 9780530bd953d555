"""Checkpoint averaging: the uniform average of the last N checkpoints, streamed.

Popel & Bojar 2018, "Training Tips for the Transformer Model", §4.10: averaging the last
checkpoints is a cheap ensemble that smooths the noise of large-learning-rate training. One
checkpoint is loaded at a time next to the running average.

Reading is careful because the files come from runs that may have crashed mid-write: a file
that cannot be read raises ``CheckpointError`` naming it (and why: empty, truncated, not a
PyTorch file, corrupt), and ``last_loadable_checkpoints`` steps over such files to the next
older one. ``save_atomic`` writes through a temporary file that never outlives a failure.

Core module: torch, numpy and the standard library only.
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from bigbatch._checks import check_int_positive
from bigbatch.averaging._common import acc_dtype
from bigbatch._files import check_output_file, save_atomic

__all__ = [
    "CheckpointError",
    "average_checkpoints",
    "check_output_file",
    "extract_state_dict",
    "last_checkpoints",
    "last_loadable_checkpoints",
    "load_model_state",
    "save_atomic",
]

_STEP = re.compile(r"(?:^|[_.-])(\d+)\.pt$")
#: Where model weights live inside common checkpoint layouts, tried in this order.
_MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
#: A class that ``weights_only`` loading refuses, as torch's UnpicklingError names it.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: empty, truncated, not a PyTorch file, or corrupt.

    ``path`` is the file and ``reason`` says what is wrong with it; the message holds both.
    A ``ValueError``, so that the CLI prints it as one line.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ---- loading -----------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """Types a trainer checkpoint's numpy RNG state needs under ``weights_only=True``.

    ``np.random.get_state()`` is a tuple holding a uint32 ndarray; these are data
    constructors only (torch's own error message recommends allow-listing them).
    """
    try:
        import numpy as np
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        import numpy as np
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    found: list[Any] = [_reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, n)]
    return found


def _format_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, judged from its bytes; None if it may be one.

    torch.save writes a zip archive whose central directory comes last, so a file cut short
    by a crash mid-write is recognised without parsing it; the legacy format is a pickle.
    """
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            return "truncated or corrupt: the zip archive torch.save writes has no central directory"
        return None
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save(_use_new_zipfile_serialization=False)
        return None
    return "not a PyTorch checkpoint (neither the zip archive nor the legacy pickle torch.save writes)"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_model_state(path: str | Path, *, key: str | None = None, weights_only: bool = True) -> "OrderedDict[str, Any]":
    """The model weights stored in ``path`` (see ``extract_state_dict`` for the layouts).

    Loads with ``mmap=True`` so that the parts of a trainer checkpoint that are not model
    weights (optimizer moments, ...) are never read into memory. ``weights_only=False`` runs
    arbitrary pickled code: use it only for files you trust.

    Raises ``FileNotFoundError`` for a missing file, ``CheckpointError`` for one that cannot
    be read, and ``ValueError`` when ``weights_only`` loading refuses a class the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = _format_problem(path)
    if problem is not None:
        raise CheckpointError(path, problem)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:
                blob = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                blob = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        refused = _REFUSED_GLOBAL.search(str(e)) if weights_only else None
        if refused is not None:
            raise ValueError(
                f"{path} holds objects that weights_only loading refuses ({refused.group(1)}); "
                "if you trust the file, load it with weights_only=False (CLI: --no-weights-only)"
            ) from None
        if isinstance(e, (AttributeError, ImportError)) and not weights_only:
            raise CheckpointError(path, f"it pickles a class that cannot be imported here ({_first_line(e)})") from None
        raise CheckpointError(path, f"truncated or corrupt: {_first_line(e)}") from None
    return extract_state_dict(blob, key=key, where=str(path))


def extract_state_dict(obj: Any, *, key: str | None = None, where: str = "checkpoint") -> "OrderedDict[str, Any]":
    """The model ``state_dict`` inside ``obj``.

    ``obj`` is a plain ``state_dict`` (a mapping whose values are tensors), or a mapping that
    holds one under ``key`` — by default the first of ``model`` (bigbatch's trainer, which
    saves ``{"model": ..., "optimizer": ..., "step": ...}``), ``state_dict`` (Lightning),
    ``model_state_dict``, ``module``.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state_dict or a dict holding one, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise ValueError(f"{where}: key {key!r} not found; top-level keys: {', '.join(map(str, list(obj)[:10]))}")
        sd = obj[key]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{where}: {key!r} is a {type(sd).__name__}, not a state_dict")
        return OrderedDict(sd)
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return OrderedDict(obj)
    for k in _MODEL_KEYS:
        if isinstance(obj.get(k), Mapping):
            return OrderedDict(obj[k])
    raise ValueError(
        f"{where}: no model weights found: not a plain state_dict and none of the keys "
        f"{', '.join(_MODEL_KEYS)} holds one (top-level keys: {', '.join(map(str, list(obj)[:10]))}); pass key="
    )



def _checkpoint_files(directory: str | Path) -> tuple[Path, list[Path]]:
    """The checkpoint directory (``RUN/checkpoints`` for a run directory) and its files, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    if (d / "checkpoints").is_dir():  # a run directory written by bigbatch train
        d = d / "checkpoints"
    found = sorted((int(m.group(1)), p.name, p) for p in d.glob("*.pt") if (m := _STEP.search(p.name)) and not p.name.startswith("."))
    if not found:
        raise ValueError(f"no checkpoints named *<step>.pt in {d}")
    return d, [p for _, _, p in found]


def last_checkpoints(directory: str | Path, n: int, *, allow_fewer: bool = False) -> list[Path]:
    """The ``n`` newest checkpoints in ``directory``, oldest first.

    Files are ``<name>_<step>.pt`` (or ``-``/``.`` before the step, or just ``<step>.pt``;
    the trainer writes ``ckpt_<step:08d>.pt``) and are ordered by
    the integer step in the name, not by modification time, which copies change. A run
    directory with a ``checkpoints/`` subdirectory is accepted too. The files are not opened:
    see ``last_loadable_checkpoints`` to step over unreadable ones.
    """
    n = check_int_positive("n", n)
    d, files = _checkpoint_files(directory)
    if len(files) < n and not allow_fewer:
        raise ValueError(f"n must be <= the {len(files)} checkpoint(s) in {d}, got {n}")
    return files[-n:]


def last_loadable_checkpoints(
    directory: str | Path,
    n: int,
    *,
    key: str | None = None,
    weights_only: bool = True,
    allow_fewer: bool = False,
) -> tuple[list[Path], list[CheckpointError]]:
    """The ``n`` newest checkpoints in ``directory`` that can be read, oldest first, and the skipped.

    Like ``last_checkpoints``, but each file is opened (memory-mapped: only its index is read)
    newest first; one that raises ``CheckpointError`` — typically the newest, cut short by a
    crash while it was written — is skipped and the next older file takes its place. Returns
    ``(paths, skipped)`` with one ``CheckpointError`` per skipped file, newest first, so the
    caller can say what was left out. Raises ``CheckpointError`` when fewer than ``n`` files
    load (unless ``allow_fewer``). A file that ``weights_only`` loading refuses is not corrupt:
    its ``ValueError`` propagates.
    """
    n = check_int_positive("n", n)
    d, files = _checkpoint_files(directory)
    if len(files) < n and not allow_fewer:
        raise ValueError(f"n must be <= the {len(files)} checkpoint(s) in {d}, got {n}")
    chosen: list[Path] = []
    skipped: list[CheckpointError] = []
    for path in reversed(files):
        if len(chosen) == n:
            break
        try:
            load_model_state(path, key=key, weights_only=weights_only)
        except CheckpointError as e:
            skipped.append(e)
            continue
        chosen.append(path)
    if len(chosen) < n and not allow_fewer:
        why = "; ".join(f"{e.path.name}: {e.reason}" for e in skipped)
        raise CheckpointError(d, f"only {len(chosen)} of its {len(files)} checkpoints can be read, n={n} asked for ({why})")
    return chosen[::-1], skipped


# ---- writing -----------------------------------------------------------------------------


# ---- averaging ---------------------------------------------------------------------------


def _describe(src: Any, i: int) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"state_dict #{i}"


def _is_averaged(t: Any) -> bool:
    return torch.is_tensor(t) and (t.is_floating_point() or t.is_complex())


def average_checkpoints(
    sources: Iterable[str | Path | Mapping[str, Any]],
    *,
    key: str | None = None,
    weights_only: bool = True,
) -> "OrderedDict[str, Any]":
    """The uniform average of the model weights in ``sources`` (paths or state_dicts).

    Floating-point (and complex) tensors are averaged; integer tensors such as BatchNorm's
    ``num_batches_tracked`` and non-tensor entries are taken from the last source. Keys,
    shapes and dtypes must agree; the error names the first mismatch. Paths are loaded one
    at a time into a running mean ``avg += (x - avg) / k`` (``torch.lerp``), so at most two
    checkpoints are in memory, and N identical checkpoints average to themselves exactly.
    Returns a plain ``state_dict`` (CPU tensors) for ``model.load_state_dict``.
    """
    avg: OrderedDict[str, Any] | None = None
    out_dtype: dict[str, torch.dtype] = {}
    first = ""
    k = 0
    for i, src in enumerate(sources):
        where = _describe(src, i)
        sd = load_model_state(src, key=key, weights_only=weights_only) if isinstance(src, (str, Path)) else extract_state_dict(src, key=key, where=where)
        k += 1
        if avg is None:
            first = where
            avg = OrderedDict()
            for name, t in sd.items():
                if _is_averaged(t):
                    _check_finite(t, name, where)
                    out_dtype[name] = t.dtype
                    avg[name] = t.detach().to("cpu", acc_dtype(t.dtype), copy=True)
                else:
                    avg[name] = t.detach().clone() if torch.is_tensor(t) else t
            del sd  # hold the running average and one checkpoint, never two
            continue
        _check_same_keys(avg, sd, first, where)
        for name, t in sd.items():
            ref = avg[name]
            if torch.is_tensor(ref) != torch.is_tensor(t):
                raise ValueError(f"{where}: {name!r} is a {type(t).__name__} but a {type(ref).__name__} in {first}")
            if not torch.is_tensor(t):
                avg[name] = t
                continue
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"{where}: {name!r} has shape {tuple(t.shape)} but {tuple(ref.shape)} in {first}")
            want = out_dtype.get(name, ref.dtype)
            if t.dtype != want:
                raise ValueError(f"{where}: {name!r} has dtype {t.dtype} but {want} in {first}")
            if name in out_dtype:
                _check_finite(t, name, where)
                ref.lerp_(t.detach().to("cpu", ref.dtype), 1.0 / k)
            else:
                avg[name] = t.detach().clone()  # integer buffers: the last one wins
        del sd
    if avg is None:
        raise ValueError("sources must name at least one checkpoint, got none")
    for name, dtype in out_dtype.items():
        avg[name] = avg[name].to(dtype)
    return avg


def _check_same_keys(ref: Mapping[str, Any], sd: Mapping[str, Any], first: str, where: str) -> None:
    if list(ref) == list(sd) or set(ref) == set(sd):
        return
    missing = [n for n in ref if n not in sd]
    extra = [n for n in sd if n not in ref]
    if missing:
        raise ValueError(f"{where}: key {missing[0]!r} of {first} is missing ({len(missing)} missing, {len(extra)} unexpected)")
    raise ValueError(f"{where}: unexpected key {extra[0]!r} not in {first} ({len(extra)} unexpected)")


def _check_finite(t: torch.Tensor, name: str, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {name!r} contains NaN or inf; refusing to average it")

"""Built-in workloads and the ``Workload`` protocol users implement.

``load_workload("mnist1d", model="mlp")`` builds a built-in; ``load_workload("my.module:factory",
**kwargs)`` imports ``my.module`` (from the current directory too, as ``python -m`` would) and
calls ``factory(**kwargs)``. docs/workloads.md states the contract a factory's result meets.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable

from bigbatch._checks import check_choice
from bigbatch.workloads.base import Batch, EpochSampler, StreamSampler, Workload, WorkloadDefaults, move_batch
from bigbatch.workloads.contract import CheckedWorkload, WorkloadContractError, check_loss_output, check_workload

__all__ = [
    "Batch",
    "CheckedWorkload",
    "EpochSampler",
    "StreamSampler",
    "Workload",
    "WorkloadDefaults",
    "WORKLOADS",
    "WorkloadContractError",
    "check_loss_output",
    "check_workload",
    "load_workload",
    "move_batch",
    "parse_workload_args",
]


#: Built-in workloads by name → ``module:factory`` (imported only when used).
WORKLOADS: dict[str, str] = {
    "mnist1d": "bigbatch.workloads.mnist1d:MNIST1D",
    "bytelm": "bigbatch.workloads.bytelm:ByteLM",
    "linreg": "bigbatch.workloads.linreg:LinReg",
}

_UNEXPECTED = re.compile(r"(?:([\w.]+)\(\) )?got an unexpected keyword argument '(\w+)'")


def _cwd_on_path() -> None:
    """Put the current directory first on ``sys.path`` if it is not there, as ``python -m`` does.

    The ``bigbatch`` console script does not (only ``python -m bigbatch`` does), so
    ``--workload mymod:make`` next to ``mymod.py`` would otherwise need ``PYTHONPATH=.``.
    """
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def _resolve(spec: str) -> tuple[Callable[..., Any], bool]:
    """The factory named by ``spec`` and whether it is the user's (not one of bigbatch's)."""
    path = WORKLOADS[check_choice("workload", spec, WORKLOADS)] if ":" not in spec else spec
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"workload must be a built-in name ({', '.join(WORKLOADS)}) or module:factory, got {spec!r}")
    if ":" in spec:
        _cwd_on_path()
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name != mod_name and not mod_name.startswith(e.name + "."):
            raise  # an import inside the user's module failed: its traceback says where
        raise ValueError(
            f"workload module {mod_name!r} cannot be imported: {e} (searched the current directory {os.getcwd()} and sys.path)"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"workload module {mod_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"workload {spec!r} is a {type(factory).__name__}, not a callable factory")
    return factory, mod_name != "bigbatch" and not mod_name.startswith("bigbatch.")


def _parameters(fn: Any) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _callee_parameters(e: TypeError, name: str | None) -> tuple[str, list[str]] | None:
    """The callable a binding ``TypeError`` names (``Toy.__init__``) and its parameters, if it can be found.

    Python raises it in the caller's frame, so the name resolves in that frame's globals.
    """
    tb = e.__traceback__
    if name is None or tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    obj: Any = tb.tb_frame.f_globals
    for part in name.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return None
    params = _parameters(obj)
    if params is None:
        return None
    return name, [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def load_workload(spec: str, **kwargs: Any) -> Workload:
    """A workload by built-in name or ``module:factory`` path, built with ``kwargs``.

    Errors that are the caller's (an unknown key, a missing method) are ``ValueError``s naming
    the workload; an error raised inside the user's factory propagates unchanged. A user's
    workload comes back as a ``CheckedWorkload``, whose first results are checked against the
    contract (docs/workloads.md).
    """
    factory, is_users = _resolve(spec)
    params = _parameters(factory) or {}
    if params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for k in kwargs:
            if k not in params:
                raise ValueError(f"--workload-arg {k!r} is not an argument of workload {spec!r}; valid: {', '.join(params) or 'none'}")
    try:
        workload = factory(**kwargs)
    except TypeError as e:
        # A factory taking **kwargs passes them on; the class it builds may refuse one.
        m = _UNEXPECTED.search(str(e))
        if m is None or m.group(2) not in kwargs:
            raise
        callee = _callee_parameters(e, m.group(1))
        valid = f"{callee[0]}() takes: {', '.join(callee[1]) or 'none'}" if callee else "its accepted arguments could not be read"
        raise ValueError(f"--workload-arg {m.group(2)!r} is not an argument of workload {spec!r} ({valid})") from None
    check_workload(workload, spec)
    return CheckedWorkload(workload, spec) if is_users else workload


def parse_workload_args(items: list[str]) -> dict[str, Any]:
    """``["model=mlp", "num_samples=4000"]`` → ``{"model": "mlp", "num_samples": 4000}`` (ints, floats, bools parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--workload-arg must be key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v

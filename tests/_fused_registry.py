"""The fused tests' parameter list: every registry entry with fused kernels (``OptimizerInfo.fused_spec``).

The built-in entries (LARS, LAMB, MERIT) and the ones that ``EXTENSIONS`` adds from outside the
package, each from one file (``tests/ext_fused_optim.py``: a module with its optimizer, kernel,
launch function and registry record). The fused tests (``test_optim_fused.py`` on a GPU,
``test_optim_fused_interpret.py`` under Triton's interpreter) run every case over this list, so
a new fused optimizer is tested by registering it, with no test edited.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from bigbatch.optim import OPTIMIZERS, OptimizerInfo, register_optimizer

EXTENSIONS = ("ext_fused_optim:FROMAGE",)
"""``module:record`` of fused optimizers defined outside bigbatch (modules in tests/)."""


def register_extensions() -> list[OptimizerInfo]:
    """Register the ``EXTENSIONS`` records (idempotent: the same record again is no error)."""
    out = []
    for spec in EXTENSIONS:
        mod, _, attr = spec.partition(":")
        out.append(register_optimizer(getattr(importlib.import_module(mod), attr)))
    return out


@contextlib.contextmanager
def extensions_registered() -> Iterator[list[OptimizerInfo]]:
    """The extensions registered for the duration of the block only (other tests see the built-ins)."""
    before = set(OPTIMIZERS)
    try:
        yield register_extensions()
    finally:
        for name in set(OPTIMIZERS) - before:
            OPTIMIZERS.pop(name)


def fused_names() -> list[str]:
    """Names of the registry's fused trust-ratio entries, extensions included."""
    with extensions_registered():
        return [name for name, info in OPTIMIZERS.items() if info.fused_spec is not None]


def default_kwargs(name: str, **over: Any) -> dict[str, Any]:
    """Constructor arguments for a generic case: lr 1e-2, weight decay 0.01 and the registry's defaults."""
    return {"lr": 1e-2, "weight_decay": 0.01, **OPTIMIZERS[name].defaults, **over}

"""The workload contract, checked where breaking it would otherwise surface far away.

A user workload that returns the wrong thing used to fail deep in the trainer — a bare loss
tensor as ``iteration over a 0-d tensor``, or worse, a 1-D loss of two elements unpacked
silently as ``(sum, count)``. ``check_workload`` checks the attributes once when the workload
is built; ``CheckedWorkload`` wraps a user's workload so that the *first* result of each
method is checked, after which the method is the workload's own bound method again: the hot
loop pays nothing. docs/workloads.md states the contract these checks enforce.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from bigbatch.workloads.base import WorkloadDefaults

__all__ = ["WorkloadContractError", "CheckedWorkload", "check_workload", "check_loss_output"]

_METHODS = ("build_model", "sampler", "fetch", "loss", "count", "evaluate")
_ATTRS = ("metric_name", "higher_is_better", "dataset_size", "count_unit", "defaults")
_UNITS = ("examples", "tokens")
_DOCS = "see docs/workloads.md"


class WorkloadContractError(ValueError):
    """A workload returned or holds something the Workload contract does not allow.

    The message names the workload, the method or attribute, what it must be and what it
    was. A ``ValueError``: the CLI prints it on one line.
    """


def _what(x: Any) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def check_workload(wl: Any, spec: str) -> None:
    """Raise ``WorkloadContractError`` unless ``wl`` has the methods and attributes of a Workload."""
    missing = [m for m in _METHODS if not callable(getattr(wl, m, None))]
    missing += [a for a in _ATTRS if not hasattr(wl, a)]
    if missing:
        raise WorkloadContractError(f"workload {spec!r} does not implement the Workload protocol: missing {', '.join(missing)} ({_DOCS})")
    if wl.count_unit not in _UNITS:
        raise WorkloadContractError(f"workload {spec!r}: count_unit must be one of {', '.join(_UNITS)}, got {wl.count_unit!r}")
    if not isinstance(wl.dataset_size, numbers.Integral) or isinstance(wl.dataset_size, bool) or wl.dataset_size <= 0:
        raise WorkloadContractError(f"workload {spec!r}: dataset_size must be a positive int (examples per epoch), got {wl.dataset_size!r}")
    if not isinstance(wl.higher_is_better, bool):
        raise WorkloadContractError(f"workload {spec!r}: higher_is_better must be a bool, got {wl.higher_is_better!r}")
    if not isinstance(wl.defaults, WorkloadDefaults):
        raise WorkloadContractError(f"workload {spec!r}: defaults must be a bigbatch.workloads.WorkloadDefaults, got {_what(wl.defaults)}")


def check_loss_output(out: Any, spec: str, expected_count: int | None = None) -> None:
    """Raise ``WorkloadContractError`` unless ``out`` is what ``Workload.loss`` must return.

    That is ``(loss_sum, count)``: a one-element floating-point tensor holding the *sum* of
    the per-unit losses, connected to the model when gradients are on, and the number of
    units (an int or a one-element integer tensor) — equal to ``count(batch)``, which the
    trainer normalises by, when ``expected_count`` is given. Reading the count syncs the
    device once: call this on the first batch only.
    """
    where = f"workload {spec!r}: loss(model, batch) must return (sum of per-unit losses, count)"
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = _what(out) if not isinstance(out, (tuple, list)) else f"a {type(out).__name__} of {len(out)} items"
        hint = " (a bare loss: return (loss.sum(), n) rather than the mean)" if torch.is_tensor(out) else ""
        raise WorkloadContractError(f"{where}, got {got}{hint}; {_DOCS}")
    loss_sum, count = out
    if not torch.is_tensor(loss_sum) or loss_sum.numel() != 1 or not loss_sum.is_floating_point():
        raise WorkloadContractError(f"{where}: the sum must be a one-element floating-point tensor, got {_what(loss_sum)}; {_DOCS}")
    if torch.is_grad_enabled() and not loss_sum.requires_grad:
        raise WorkloadContractError(f"{where}: the sum does not require grad (computed under no_grad, or detached?); {_DOCS}")
    if torch.is_tensor(count):
        if count.numel() != 1 or count.is_floating_point() or count.is_complex():
            raise WorkloadContractError(f"{where}: the count must be an int or a one-element integer tensor, got {_what(count)}; {_DOCS}")
        count = int(count)
    elif not isinstance(count, numbers.Integral):
        raise WorkloadContractError(f"{where}: the count must be an int or a one-element integer tensor, got {_what(count)}; {_DOCS}")
    if expected_count is not None and int(count) != int(expected_count):
        raise WorkloadContractError(
            f"workload {spec!r}: loss(model, batch) counted {int(count)} units but count(batch) says {int(expected_count)}; "
            f"the trainer divides the summed loss by count(batch), so the two must agree; {_DOCS}"
        )


def _as_number(x: Any) -> Any:
    """A one-element tensor as a Python number (the trainer converts those itself); anything else as is."""
    return x.item() if torch.is_tensor(x) and x.numel() == 1 else x


def _check_count(out: Any, spec: str) -> None:
    out = _as_number(out)
    if not isinstance(out, numbers.Integral) or isinstance(out, bool) or out < 0:
        raise WorkloadContractError(f"workload {spec!r}: count(batch) must return an int >= 0 (loss units in the batch), got {out!r}; {_DOCS}")


def _check_fetch(out: Any, spec: str, indices: Any) -> None:
    where = f"workload {spec!r}: fetch(indices) must return a mapping of name to tensor whose first dimension indexes the examples"
    if not isinstance(out, Mapping) or not out:
        raise WorkloadContractError(f"{where}, got {_what(out)}; {_DOCS}")
    n = len(indices)
    for k, v in out.items():
        if not torch.is_tensor(v):
            raise WorkloadContractError(f"{where}: {k!r} is {_what(v)}; {_DOCS}")
        if v.dim() == 0 or v.shape[0] != n:
            raise WorkloadContractError(f"{where}: {k!r} has shape {tuple(v.shape)} for {n} indices; {_DOCS}")


def _check_sampler(out: Any, spec: str) -> None:
    missing = [m for m in ("next", "state_dict", "load_state_dict") if not callable(getattr(out, m, None))]
    if missing:
        raise WorkloadContractError(
            f"workload {spec!r}: sampler(seed) must return a sampler (EpochSampler, StreamSampler or one with next/state_dict/"
            f"load_state_dict), got {_what(out)} without {', '.join(missing)}; {_DOCS}"
        )


def _check_model(out: Any, spec: str) -> None:
    if not isinstance(out, nn.Module):
        raise WorkloadContractError(f"workload {spec!r}: build_model() must return a torch.nn.Module, got {_what(out)}; {_DOCS}")


def _check_metric(out: Any, spec: str) -> None:
    out = _as_number(out)
    if not isinstance(out, numbers.Real) or isinstance(out, bool):
        raise WorkloadContractError(f"workload {spec!r}: evaluate(model, device) must return a float (the metric), got {_what(out)}; {_DOCS}")


class CheckedWorkload:
    """A user's workload whose first result from each method is checked against the contract.

    Every attribute not named here is the wrapped workload's (``wl.my_helper`` still works);
    ``wrapped`` is the workload itself. After a method's first call passed its check, the
    method is replaced on this object by the workload's own bound method, so later calls
    cost nothing extra.
    """

    def __init__(self, workload: Any, spec: str) -> None:
        object.__setattr__(self, "wrapped", workload)
        object.__setattr__(self, "_spec", spec)
        for name, check in (
            ("build_model", lambda out, *a, **k: _check_model(out, spec)),
            ("sampler", lambda out, *a, **k: _check_sampler(out, spec)),
            ("fetch", lambda out, *a, **k: _check_fetch(out, spec, a[0] if a else k["indices"])),
            ("count", lambda out, *a, **k: _check_count(out, spec)),
            ("loss", lambda out, *a, **k: check_loss_output(out, spec, workload.count(a[1] if len(a) > 1 else k["batch"]))),
            ("evaluate", lambda out, *a, **k: _check_metric(out, spec)),
        ):
            object.__setattr__(self, name, self._first_call(name, check))

    def _first_call(self, name: str, check: Callable[..., None]) -> Callable[..., Any]:
        own = getattr(self.wrapped, name)

        def first(*args: Any, **kwargs: Any) -> Any:
            out = own(*args, **kwargs)
            check(out, *args, **kwargs)
            object.__setattr__(self, name, own)  # checked once: from now on the workload's own method
            return out

        first.__doc__ = own.__doc__
        return first

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the wrapper: everything else is the workload's.
        return getattr(object.__getattribute__(self, "wrapped"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.wrapped, name, value)

    def __repr__(self) -> str:
        return f"CheckedWorkload({self.wrapped!r})"

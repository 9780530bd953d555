"""Test-only fault injection: ``BIGBATCH_TEST_FAULT=rank:step`` fails that rank once at that step.

The restart tests (torchrun ``--max-restarts``) need a worker to die mid-run. The hook wraps the
training step only when the variable is set, so the loop itself carries no test code.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

__all__ = ["parse_fault", "with_fault"]

F = TypeVar("F", bound=Callable)


def parse_fault(spec: str | None) -> tuple[int, int] | None:
    """``"rank:step"`` → ``(rank, step)``; None when unset."""
    if not spec:
        return None
    try:
        rank, step = spec.split(":")
        return int(rank), int(step)
    except ValueError:
        raise ValueError(f"BIGBATCH_TEST_FAULT must be RANK:STEP, got {spec!r}") from None


def with_fault(step_fn: F, rank: int, restarted: bool) -> F:
    """``step_fn`` unchanged, or wrapped to raise after the configured step on the configured rank.

    The fault fires once: a worker restarted by torchrun (``restarted``) runs clean. It fires after
    the optimizer step, before any checkpoint of that step, as a crash in the step would.
    """
    fault = parse_fault(os.environ.get("BIGBATCH_TEST_FAULT"))
    if fault is None or restarted or fault[0] != rank:
        return step_fn

    def faulty(run, state, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = step_fn(run, state, *args, **kwargs)
        if state.step == fault[1]:
            raise RuntimeError(f"injected fault on rank {rank} at step {state.step} (BIGBATCH_TEST_FAULT)")
        return result

    return faulty  # type: ignore[return-value]

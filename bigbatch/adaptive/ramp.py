"""Megatron-LM's linear batch-size ramp in samples."""

from __future__ import annotations

from typing import Any

from bigbatch._checks import check_int_nonnegative, check_int_positive
from bigbatch.adaptive.base import BatchSizeController, ControllerState

__all__ = ["RampController"]


class RampController(BatchSizeController):
    """Megatron-LM's batch-size ramp: linear in samples, in steps of ``increment``.

    With n = (end_batch − start_batch)/increment increments spread evenly over ``ramp_samples``,
    the batch after s samples is start_batch + ⌊s·n/ramp_samples⌋·increment, and end_batch from
    ``ramp_samples`` on (Megatron's ``RampupBatchsizeNumMicroBatches``, computed in exact integer
    arithmetic rather than floats). The readings are not used.

    Args:
        start_batch, end_batch: the ramp's ends (multiples of ``granularity``, end ≥ start).
        ramp_samples: samples over which the batch ramps (> 0).
        increment: batch increment (a multiple of ``granularity`` dividing end − start);
            default ``granularity``.
        granularity: micro-batch × world size.
    """

    name = "ramp"

    def __init__(
        self,
        *,
        start_batch: int,
        end_batch: int,
        ramp_samples: int,
        increment: int | None = None,
        granularity: int = 1,
    ) -> None:
        super().__init__(granularity=granularity)
        g = self.granularity
        self.start_batch = check_int_positive("start_batch", start_batch)
        self.end_batch = check_int_positive("end_batch", end_batch)
        self.ramp_samples = check_int_positive("ramp_samples", ramp_samples)
        self.increment = g if increment is None else check_int_positive("increment", increment)
        for k in ("start_batch", "end_batch", "increment"):
            if getattr(self, k) % g:
                raise ValueError(f"{k} must be a multiple of granularity {g}, got {getattr(self, k)}")
        if self.end_batch < self.start_batch:
            raise ValueError(f"end_batch must be >= start_batch {self.start_batch}, got {self.end_batch}")
        span = self.end_batch - self.start_batch
        if span % self.increment:
            raise ValueError(
                f"increment must divide end_batch - start_batch = {span}, got {self.increment}"
            )
        self.num_increments = span // self.increment

    def config(self) -> dict[str, Any]:
        return {
            "start_batch": self.start_batch,
            "end_batch": self.end_batch,
            "ramp_samples": self.ramp_samples,
            "increment": self.increment,
            "granularity": self.granularity,
        }

    def batch_size_at(self, samples: int) -> int:
        """The ramp's batch after ``samples`` samples (a pure function)."""
        samples = check_int_nonnegative("samples", samples)
        if samples >= self.ramp_samples:
            return self.end_batch
        return self.start_batch + (samples * self.num_increments // self.ramp_samples) * self.increment

    def next_batch_size(self, state: ControllerState) -> int:
        self._check_current(state)
        new = self.batch_size_at(state.samples)
        return self._change(state, new, f"ramp: {state.samples}/{self.ramp_samples} samples")

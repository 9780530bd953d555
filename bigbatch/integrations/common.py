"""What the framework adapters share: the global batch, recipe rescaling and the samples scheduler.

Frameworks count optimizer steps per process; bigbatch counts samples seen by the whole job. The
bridge is the *global* batch, ``per-device batch × accumulation × world size`` — the number of
examples behind one optimizer step — so that a schedule written in samples does not run
``world_size`` times too slow when each process counts only its own batches (the Accelerate
trap: huggingface/accelerate#963).
"""

from __future__ import annotations

from typing import Any

import torch

from bigbatch._checks import check_int_positive
from bigbatch.recipe import Recipe
from bigbatch.rules import LR_ONLY_RULES
from bigbatch.scaling import Rescaled, lr_factor, rescale
from bigbatch.schedules import SampleLR, Schedule

__all__ = ["global_batch_size", "rescale_for_global_batch", "sample_lr_scheduler", "scale_lrs", "LR_ONLY_RULES", "leading_dim", "MonitorTap"]


def global_batch_size(per_device_batch: int, accumulation: int = 1, world_size: int = 1) -> int:
    """Examples behind one optimizer step: ``per_device_batch × accumulation × world_size``."""
    return (check_int_positive("per_device_batch", per_device_batch) * check_int_positive("accumulation", accumulation)
            * check_int_positive("world_size", world_size))


def rescale_for_global_batch(recipe: Recipe, *, per_device_batch: int, accumulation: int = 1, world_size: int = 1,
                             rule: str | None = None) -> Rescaled:
    """``recipe`` moved by ``rule`` to the global batch the framework will run.

    The recipe's ``batch_size`` is the global batch it was tuned at; the new one is
    :func:`global_batch_size` of the arguments (world size included).
    """
    return rescale(recipe, global_batch_size(per_device_batch, accumulation, world_size), rule)


def sample_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule | Recipe, *, global_batch: int) -> SampleLR:
    """A :class:`SampleLR` that advances by ``global_batch`` samples on each plain ``step()``.

    Frameworks call ``scheduler.step()`` once per optimizer step on every process; with the
    *global* batch as the increment, the LR at step ``t`` is ``schedule(t × global_batch)``. A
    :class:`Recipe` is turned into its schedule (it needs ``dataset_size``); rescale it to the
    global batch first (:func:`rescale_for_global_batch`). The optimizer's LRs should be the
    schedule's peak (each group keeps its ratio to it).
    """
    if isinstance(schedule, Recipe):
        schedule = schedule.to_schedule()
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a bigbatch Schedule or Recipe, got {type(schedule).__name__}")
    return SampleLR(optimizer, schedule, batch_size=check_int_positive("global_batch", global_batch))


def scale_lrs(optimizer: torch.optim.Optimizer, scheduler: Any, rule: str, old_batch: int, new_batch: int) -> float:
    """Move a running optimizer's LRs (and its scheduler's base LRs) from ``old_batch`` to ``new_batch``.

    Only LR-only rules (:data:`LR_ONLY_RULES`) can be applied mid-run; returns the factor.
    """
    if rule not in LR_ONLY_RULES:
        raise ValueError(f"rule must be one of {', '.join(LR_ONLY_RULES)} to rescale a running optimizer "
                         f"(the others change warmup or betas), got {rule!r}")
    f = lr_factor(rule, check_int_positive("new_batch", new_batch) / check_int_positive("old_batch", old_batch))
    for g in optimizer.param_groups:
        g["lr"] *= f
        if "initial_lr" in g:
            g["initial_lr"] *= f
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        # Schedulers recompute the LR from base_lrs at their next step: scale them too, or the
        # change would last one step.
        scheduler.base_lrs = [b * f for b in scheduler.base_lrs]
        if isinstance(scheduler, SampleLR):
            scheduler.batch_size = new_batch
    return f


def leading_dim(batch: Any) -> int:
    """Examples in a batch: the leading dimension of its first tensor (dicts, lists, tuples searched in order)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return leading_dim(item)
        except ValueError:
            continue
    raise ValueError(f"cannot find a tensor in the batch ({type(batch).__name__}) to count its examples; pass count_fn=")


def _queue_after_backward(fn: Any) -> None:
    # Runs fn when the current backward has finished. Queued twice: the engine runs callbacks in
    # queue order and runs those queued by a callback too, so the inner one comes after DDP's own
    # end-of-backward callback (queued by the first gradient, later than ours) has written the
    # all-reduced gradient into .grad — and before anything after backward (unscaling, clipping).
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))


class MonitorTap:
    """Drives a :class:`~bigbatch.noise.NoiseMonitor` from inside the framework's backward passes.

    ``micro_batch(loss, ...)`` is called just before ``loss`` is back-propagated. A hook on
    ``loss`` reads ``d(what is back-propagated)/d(loss)`` — every factor the framework applies
    after ``loss`` (accumulation division, world-size factor, AMP loss scale) — and opens the monitor's
    micro-batch before any parameter gradient arrives; the end of the backward closes it and, on
    the last micro-batch of the optimizer step, ends the monitor's step: the gradient it reads is
    the accumulated (reduced, still AMP-scaled, consistent with the scale read) gradient, before
    the framework unscales or clips it.
    """

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.in_step = False
        self.steps = 0
        self.last_reading: Any = None
        self.new_reading = False

    def micro_batch(self, loss: torch.Tensor, *, count: Any, unit_scale: Any, samples: Any = None, last: bool) -> None:
        """Before ``loss.backward()``: ``unit_scale`` is the factor from the summed loss to ``loss``
        (``1/count`` for a mean); ``last``: this backward ends the optimizer step."""
        if not loss.requires_grad:
            return
        if not self.in_step:
            self.monitor.begin_step()
            self.in_step = True
        if not self.monitor.measuring:  # an unmeasured step: no hooks and no device work at all
            if last:
                self._end_step()
            return
        mb = self.monitor.micro_batch(count, samples=samples, loss_scale=1.0)
        state = {"entered": False}

        def finish() -> None:
            if state["entered"]:
                mb.__exit__(None, None, None)
            if last and self.in_step:
                self._end_step()

        def on_loss_grad(g: torch.Tensor) -> None:
            mb.loss_scale = g.detach().reshape(()).float() * unit_scale
            mb.__enter__()
            state["entered"] = True
            _queue_after_backward(finish)

        loss.register_hook(on_loss_grad)

    def _end_step(self) -> None:
        self.in_step = False
        measured = self.monitor.measuring
        reading = self.monitor.end_step()
        if measured:  # kept until a log takes it
            self.last_reading, self.new_reading = reading, True
        self.steps += 1

    def abandon(self) -> None:
        """The optimizer step came without its last backward being seen: drop the partial step
        (the next ``micro_batch`` starts a new one) rather than mix two steps' micro-batches."""
        self.in_step = False

    def metrics(self, prefix: str) -> dict[str, float]:
        """The monitor's current estimates (one host sync), once per new reading; else empty."""
        if not self.new_reading or self.last_reading is None:
            return {}
        self.new_reading = False
        r = self.last_reading
        return {f"{prefix}b_simple": float(r.b_simple), f"{prefix}grad_sqnorm": float(r.grad_sqnorm),
                f"{prefix}trace_sigma": float(r.trace_sigma)}

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])
        self.steps = int(state["steps"])

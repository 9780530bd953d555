"""One optimizer step, and the batch-size decision after it.

``train_step`` draws the global batch, realises it as micro-batches × accumulation steps ×
ranks, runs forward/backward with the loss normalised by the *global* count (examples or
tokens) so that the accumulated gradient equals the big-batch gradient exactly, lets the noise
monitor watch, and steps the optimizer. ``adapt`` asks the batch-size controller for the next
batch. Neither reads a value back from the device: the loop stays free of host syncs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from bigbatch.adaptive import ControllerState
from bigbatch.noise import NoiseMonitor
from bigbatch.train.parallel import gradient_sync
from bigbatch.train.plan import BatchPlan, plan_batch
from bigbatch.train.setup import Run, apply_hparams, noise_every, noise_mode
from bigbatch.train.state import RunState
from bigbatch.workloads import Workload, move_batch

__all__ = ["Interval", "train_step", "adapt", "controller_state"]


@dataclass(slots=True)
class Interval:
    """What the steps since the last log record add up to (the loss stays on the device)."""

    loss: torch.Tensor
    count: int = 0
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, device: torch.device) -> "Interval":
        return cls(torch.zeros((), device=device))

    def reset(self) -> None:
        self.loss.zero_()
        self.count, self.steps, self.t0 = 0, 0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (evaluation, checkpoints) out of the interval's step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t


@contextlib.contextmanager
def _measure(monitor: NoiseMonitor | None, wl: Workload, mb: dict, count: int) -> Iterator[None]:
    """The noise monitor's micro-batch bracket (examples and loss units both known to it)."""
    if monitor is None:
        yield
        return
    samples = None
    if wl.count_unit != "examples":
        samples = next(iter(v for v in mb.values() if torch.is_tensor(v))).shape[0]
    with monitor.micro_batch(count, samples=samples):
        yield


def _fetch(run: Run, plan: BatchPlan) -> list[dict]:
    """This rank's micro-batches of the next global batch, still on the host."""
    info, wl = run.info, run.wl
    indices = run.sampler.next(plan.batch_size)
    per_rank = plan.batch_size // info.world_size
    local = indices[info.rank * per_rank : (info.rank + 1) * per_rank]
    m = plan.micro_batch_size
    return [wl.fetch(local[i * m : (i + 1) * m]) for i in range(plan.accum_steps)]


def _to_device(run: Run, host: list[dict]) -> tuple[list[dict], list[int], Any]:
    """The micro-batches on the device, their loss units and the loss scale.

    The loss units are counted on the host copies: counting on the device would be a host sync
    per micro-batch, which stops the CPU from running ahead of the GPU.
    """
    info, wl, device = run.info, run.wl, run.device
    counts = [wl.count(mb) for mb in host]
    micro = [move_batch(mb, device) for mb in host]
    n_local = sum(counts)
    if info.enabled:
        # A pinned, non-blocking copy: torch.tensor(x, device=cuda) from pageable memory
        # would wait for the GPU to drain every step and cost the CPU its run-ahead.
        n_global = torch.tensor([float(n_local)], pin_memory=device.type == "cuda")[0]
        n_global = n_global.to(device, non_blocking=True)
        dist.all_reduce(n_global)  # stays on the device: no host sync
    else:
        n_global = float(n_local)
    # DDP averages gradients over ranks; scaling by world/N makes the result Σ loss / N.
    return micro, counts, info.world_size / n_global


def train_step(run: Run, state: RunState, plan: BatchPlan, interval: Interval) -> str | None:
    """One optimizer step at ``plan``; advances ``state``. Returns the optimizer's message if it
    refused a non-finite gradient (LARS/LAMB/MERIT do, leaving their state untouched), else None."""
    host = _fetch(run, plan)
    batch = plan.batch_size
    run.hparams_batch = apply_hparams(run.optimizer, run.scaling, batch, run.hparams_batch)
    # The LR of the step that ends at samples + batch: the schedule runs in samples, so a
    # batch change keeps its position and only the rule's factor for the new batch moves.
    run.lr = lr = run.scaling.lr_at(state.samples + batch, batch)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g["lr_ratio"]
    monitor = run.monitor
    if monitor is not None:
        monitor.begin_step()
        if monitor.mode == "split":
            host = [piece for mb in host for piece in monitor.split_batch(mb)]
    micro, counts, scale = _to_device(run, host)
    for i, (mb, count) in enumerate(zip(micro, counts)):
        sync = not run.info.enabled or i == len(micro) - 1
        with gradient_sync(run.model, sync), _measure(monitor, run.wl, mb, count):
            with run.autocast():
                loss_sum, _ = run.wl.loss(run.model, mb)
            (loss_sum * scale).backward()
        interval.loss += loss_sum.detach().float()
    if monitor is not None:
        run.reading = monitor.end_step()
    interval.count += sum(counts)
    try:
        run.optimizer.step()
    except FloatingPointError as e:
        return str(e)
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.raw_model, batch)
    state.step += 1
    state.samples += batch
    interval.steps += 1
    return None


def refused_steps(run: Run, state: RunState) -> str | None:
    """The optimizer's message if it skipped non-finite steps since the last call, else None.

    Only for a run whose optimizer defers the check (``Run.deferred_nonfinite``: fused LARS/LAMB/
    MERIT on a GPU); reading the count syncs, so the loop calls this where it syncs anyway.
    """
    if not run.deferred_nonfinite:
        return None
    total = run.optimizer.skipped_steps
    new, run.skipped_seen = total - run.skipped_seen, total
    if new <= 0:
        return None
    return (f"{type(run.optimizer).__name__}: non-finite (nan/inf) gradient in {new} step(s) up to step "
            f"{state.step}; those steps were not applied and left the optimizer state unchanged")


def controller_state(monitor: NoiseMonitor | None, state: RunState, batch_size: int) -> ControllerState:
    """The controller's view of the run: samples, batch, and the noise readings in examples.

    With a token-normalised loss the estimator counts tokens; the monitor's running tokens per
    example converts B_simple and tr(Σ) alike, so that B_simple = tr(Σ)/|G|² still holds. The
    number of readings and B_simple's relative standard error tell the controller whether the
    estimate has settled.
    """
    if monitor is None or monitor.estimator.n_updates == 0:
        return ControllerState(samples=state.samples, batch_size=batch_size, step=state.step)
    return ControllerState.from_estimator(monitor.estimator, samples=state.samples, batch_size=batch_size,
                                          step=state.step, units_per_sample=monitor.units_per_sample)


def adapt(run: Run, state: RunState, plan: BatchPlan, log_step: bool) -> BatchPlan:
    """The controller's batch for the next step, realised by accumulation steps / micro-batch.

    Noise readings are handed over on log steps only, where they are fetched from the device
    anyway: no extra host sync in the loop (a ramp needs none at all).
    """
    batch = plan.batch_size
    new = run.controller.next_batch_size(controller_state(run.monitor if log_step else None, state, batch))
    if new == batch:
        return plan
    plan = plan_batch(new, run.info.world_size, run.cfg.micro_batch_size)
    state.batch_size = plan.batch_size
    state.batch_changes += 1
    changes = run.controller.changes
    run.metrics.write({"kind": "batch_size", "step": state.step, "samples": state.samples, "old": batch,
                       "new": plan.batch_size, "accum_steps": plan.accum_steps,
                       "micro_batch_size": plan.micro_batch_size, "reason": changes[-1].reason if changes else ""})
    if run.monitor is not None and noise_mode(run, plan) != run.monitor.mode:
        # One micro-batch per step became several (or back): 'auto' means another mode now. The
        # estimates carry over; the mode is a function of the plan, so a resumed run agrees.
        mode = noise_mode(run, plan)
        run.monitor.set_mode(mode)
        run.monitor.every = noise_every(run, mode)
    return plan

"""Dense evaluation: locate each first crossing of a target to within a fraction of its samples.

An evaluation every ``eval_every`` samples only brackets a crossing: the target was reached
somewhere in the last interval, so samples-to-target are known to within that interval. With
``target_resolution`` set, the trainer keeps an in-memory ``Snapshot`` of everything that moves
during training (weights, optimizer, sampler position, RNG states, controller, EMA, noise
monitor, counters) at each evaluation. When an evaluation shows a target crossed for the first
time and the interval since the previous one is wider than ``target_resolution`` of the samples
at the crossing, ``replay`` puts the previous evaluation's snapshot back, trains the same
steps again evaluating every max(one step, ``target_resolution``/2 of the samples so far), and
stops at the first evaluation past every target crossed in that interval. The run then
continues from the state it had before the replay (a second snapshot), so the replay changes
nothing of the trajectory: the final weights are those of a run without dense evaluation.

The replay draws the same batches (the sampler's position) with the same random numbers (the
RNG states; each dense evaluation runs on a saved-and-restored RNG state, so evaluating does
not shift the training draws), so on a CPU it retraces the original steps bit for bit. On a GPU
kernels that are not deterministic may make the retraced weights differ in their last bits;
the crossing found is then that of a trajectory equal up to rounding. A crossing the replay
does not reproduce before the evaluation that showed it stays at that evaluation, with the
(then small) gap to the last dense evaluation as its resolution.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bigbatch.train.checkpoint import rng_state, set_rng_state
from bigbatch.train.plan import BatchPlan
from bigbatch.train.setup import Run
from bigbatch.train.state import RunState

__all__ = ["Snapshot", "take_snapshot", "restore_snapshot", "replay", "dense_every", "logged_b_simple", "DenseEval"]


@dataclass(slots=True)
class Snapshot:
    """A copy of a run's moving parts at one point (in memory, on the run's device)."""

    state: RunState
    plan: BatchPlan
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    sampler: dict[str, Any]
    rng: dict[str, Any]
    controller: dict[str, Any] | None
    ema: dict[str, Any] | None
    monitor: dict[str, Any] | None
    hparams_batch: int | None
    lr: float
    reading: Any


def take_snapshot(run: Run, state: RunState, plan: BatchPlan) -> Snapshot:
    """Copy the run's state now (tensors cloned, so training on does not change the copy)."""
    return Snapshot(
        state=copy.deepcopy(state),
        plan=plan,
        model={k: v.detach().clone() for k, v in run.raw_model.state_dict().items()},
        optimizer=copy.deepcopy(run.optimizer.state_dict()),
        sampler=copy.deepcopy(run.sampler.state_dict()),
        rng=rng_state(),
        controller=None if run.controller is None else copy.deepcopy(run.controller.state_dict()),
        ema=None if run.ema is None else run.ema.state_dict(),
        monitor=None if run.monitor is None else copy.deepcopy(run.monitor.state_dict()),
        hparams_batch=run.hparams_batch,
        lr=run.lr,
        reading=run.reading,  # resolved by the monitor's state_dict() above, and never changed after
    )


def restore_snapshot(run: Run, snap: Snapshot) -> None:
    """Put the run's moving parts back as they were in ``snap`` (the ``RunState`` is the caller's)."""
    run.raw_model.load_state_dict(snap.model)  # copies into the same parameters: the optimizer keeps them
    run.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
    run.sampler.load_state_dict(snap.sampler)
    set_rng_state(snap.rng)
    if run.controller is not None and snap.controller is not None:
        run.controller.load_state_dict(copy.deepcopy(snap.controller))
    if run.ema is not None and snap.ema is not None:
        run.ema.load_state_dict(snap.ema)
    if run.monitor is not None and snap.monitor is not None:
        run.monitor.load_state_dict(copy.deepcopy(snap.monitor))
    run.hparams_batch, run.lr, run.reading = snap.hparams_batch, snap.lr, snap.reading


def dense_every(samples: int, resolution: float) -> float:
    """Samples between dense evaluations at ``samples``: half the resolution, so that the gap
    before a crossing at ``c`` samples stays below ``resolution·c`` (or is one step)."""
    return 0.5 * resolution * samples


def logged_b_simple(run: Run) -> float | None:
    """The noise reading a train record logs now (``b_simple_samples`` if known), if finite and > 0."""
    if run.monitor is None:
        return None
    b = run.reading.b_simple_samples if run.reading is not None and run.reading.b_simple_samples is not None \
        else run.monitor.estimator.b_simple
    return float(b) if math.isfinite(b) and b > 0 else None


class _Discard:
    """A metrics writer that drops what the replayed steps would log a second time."""

    def write(self, rec: dict[str, Any]) -> None:
        pass


def replay(
    run: Run,
    start: Snapshot,
    stop_step: int,
    pending: list[float],
    better: Callable[[float, float], bool],
    evaluate: Callable[[], float],
    step_fn: Callable[..., str | None],
    adapt_fn: Callable[..., BatchPlan],
    interval_factory: Callable[[], Any],
) -> "Replay":
    """Retrain from ``start`` up to (not including) step ``stop_step``, evaluating densely.

    Returns a ``Replay``: for each target in ``pending`` first reached by a dense evaluation, its
    crossing (``step``, ``samples``, ``prev_step``, ``prev_samples`` of the evaluation before it,
    and ``b_simple``, the reading logged last at or before it); the step and samples of the last
    dense evaluation; the steps retrained. Dense evaluations are written to the
    run's metrics as ``eval`` records with ``"dense": true``; nothing else of the replay is
    logged. Leaves the run's moving parts in the replayed state: the caller restores its own.
    """
    restore_snapshot(run, start)
    rs = copy.deepcopy(start.state)
    plan = start.plan
    interval = interval_factory()
    res = float(run.cfg.target_resolution)
    prev_step, prev_samples = rs.step, rs.samples
    reading = rs.b_simple_log[-1] if rs.b_simple_log else None
    found: dict[float, dict[str, Any]] = {}
    metrics, run.metrics = run.metrics, _Discard()
    name = run.wl.metric_name
    try:
        while len(found) < len(pending) and rs.step + 1 < stop_step:
            if step_fn(run, rs, plan, interval) is not None:
                break  # a refused step: the original run took it, so this replay has left its path
            log_step = rs.step % run.r.log_every == 0
            if run.controller is not None:
                plan = adapt_fn(run, rs, plan, log_step)
            if log_step:
                b = logged_b_simple(run)
                reading = b if b is not None else reading
                interval.reset()
            if rs.samples - prev_samples < dense_every(rs.samples, res):
                continue
            rng = rng_state()  # an evaluation must not shift the random numbers training draws
            value = evaluate()
            set_rng_state(rng)
            metrics.write({"kind": "eval", "step": rs.step, "samples": rs.samples, name: value, "dense": True})
            if not math.isfinite(value):
                break
            for t in pending:
                if t not in found and better(value, t):
                    found[t] = {"step": rs.step, "samples": rs.samples, "prev_step": prev_step,
                                "prev_samples": prev_samples, "b_simple": reading}
            prev_step, prev_samples = rs.step, rs.samples
    finally:
        run.metrics = metrics
    return Replay(found, prev_step, prev_samples, rs.step - start.state.step)


@dataclass(slots=True)
class Replay:
    """What ``replay`` found."""

    found: dict[float, dict[str, Any]]
    last_step: int
    last_samples: int
    steps: int


class DenseEval:
    """The trainer's side of dense evaluation: the snapshot at the last evaluation, and the
    replay when an evaluation shows a new crossing too far from the previous evaluation.

    ``targets``: every metric value whose first crossing is located (the stopping target and
    ``record_targets``); ``better(a, b)``: a is at or past b in the metric's direction.
    """

    def __init__(self, run: Run, targets: list[float], better: Callable[[float, float], bool],
                 evaluate: Callable[[], float]) -> None:
        if run.info.enabled:
            raise ValueError("target_resolution (--target-resolution) works in single-process runs (a study's cells); "
                             "under torchrun every rank would have to replay together, which is not supported")
        self.run, self.targets, self.better, self.evaluate = run, targets, better, evaluate
        self.resolution = float(run.cfg.target_resolution)
        self.snap: Snapshot | None = None
        self.replays = 0
        self.replayed_steps = 0

    def _uncrossed(self, state: RunState) -> list[float]:
        done = {c["target"] for c in state.crossings}
        return [t for t in self.targets if t not in done]

    def evaluated(self, state: RunState, plan: BatchPlan) -> None:
        """After an evaluation: keep a snapshot here while some target is still to be crossed
        (and the next evaluation is more than one step away: one step cannot be split)."""
        one_step = state.next_eval - state.samples <= plan.batch_size
        self.snap = take_snapshot(self.run, state, plan) if self._uncrossed(state) and not one_step else None

    def locate(self, state: RunState, plan: BatchPlan, value: float) -> dict[float, dict[str, Any]]:
        """The crossings of targets first reached by ``value`` (the evaluation at ``state``),
        located by a replay where the gap since the last evaluation is wider than the resolution.

        Empty where no replay is needed (the caller then records the crossing at this evaluation).
        """
        new = [t for t in self._uncrossed(state) if self.better(value, t)]
        prev = state.last_eval_samples or 0
        if not new or self.snap is None or state.samples - prev <= self.resolution * state.samples:
            return {}
        from bigbatch.train.step import Interval, adapt, train_step

        here = take_snapshot(self.run, state, plan)
        rep = replay(self.run, self.snap, state.step, new, self.better, self.evaluate, train_step, adapt,
                     lambda: Interval.start(self.run.device))
        self.replays += 1
        self.replayed_steps += rep.steps
        restore_snapshot(self.run, here)
        found = dict(rep.found)
        for t in new:  # not reproduced by the replay before this evaluation: the crossing is here
            found.setdefault(t, {"step": state.step, "samples": state.samples, "prev_step": rep.last_step,
                                 "prev_samples": rep.last_samples, "b_simple": None})
        return found

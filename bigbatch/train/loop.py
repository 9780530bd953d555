"""The reference training loop: one loop for CPU, one GPU and torchrun DDP/FSDP2.

Read ``train`` top to bottom (nanoGPT style): set up (``setup.py``: components, resume), then for
each optimizer step ``train_step`` (``step.py``: micro-batches, noise measurement, optimizer
step), the batch-size controller, logging, evaluation and checkpoints at sample-count
boundaries; at the end a final checkpoint, the checkpoint average and the summary. Time is
counted in samples. The run's counters are a ``RunState``, which is also what a checkpoint saves.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.averaging import average_checkpoints, last_checkpoints
from bigbatch.train.checkpoint import list_checkpoints, rng_state, save_atomic, write_json_atomic
from bigbatch.train.config import TrainConfig
from bigbatch.train.dense import DenseEval
from bigbatch.train.dist import shutdown_distributed
from bigbatch.train.faults import with_fault
from bigbatch.train.parallel import full_model_state, full_optimizer_state, load_full_model_state
from bigbatch.train.plan import BatchPlan, plan_batch
from bigbatch.train.setup import Run, setup
from bigbatch.train.state import Checkpoint, RunState
from bigbatch.train.step import Interval, adapt, refused_steps, train_step
from bigbatch.workloads import Workload

__all__ = ["train", "TrainResult", "BatchPlan", "plan_batch", "evaluate", "save_checkpoint", "log_interval"]


@dataclass(slots=True)
class TrainResult:
    """What ``train`` returns (also written to ``summary.json``)."""

    summary: dict[str, Any]
    model: nn.Module


def train(cfg: TrainConfig, workload: Workload | None = None) -> TrainResult:
    """Run one training run as configured; returns the summary and the trained model."""
    run, state, plan = setup(cfg, workload)
    r = run.r
    step = with_fault(train_step, run.info.rank, run.restarted)  # train_step itself unless a test asks
    interval = Interval.start(run.device)
    clock = [time.perf_counter()]  # start of the time not yet in state.wall_before
    stopped: str | None = None
    error: str | None = None
    steps_this_run = 0
    dense = _dense_eval(run)
    if dense is not None and state.step > 0 and state.last_eval_samples == state.samples:
        dense.evaluated(state, plan)  # resumed from a checkpoint taken at an evaluation
    run.model.train()
    try:
        if state.samples == 0 and state.next_eval == 0:
            state.next_eval = r.eval_every
            with interval.paused():
                state.initial_metric = evaluate(run)
                if _record(run, state, plan, state.initial_metric, dense):
                    stopped = "target"
        while stopped is None and state.samples < r.budget:
            if cfg.max_steps is not None and steps_this_run >= cfg.max_steps:
                stopped = "max_steps"
                break
            batch = plan.batch_size
            error = step(run, state, plan, interval)
            if error is not None:
                stopped = "diverged"
                break
            steps_this_run += 1
            log_step = state.step % r.log_every == 0
            if run.controller is not None:
                plan = adapt(run, state, plan, log_step)
            if log_step or state.samples >= r.budget:
                error = refused_steps(run, state)
                if error is not None or not log_interval(run, state, plan, batch, interval):
                    stopped = "diverged"
                    break
            with interval.paused():  # step_time is training time: evaluations and checkpoints are left out
                if state.samples >= state.next_eval or state.samples >= r.budget:
                    stopped = _evaluate_due(run, state, plan, dense)
                    if stopped == "diverged":
                        break
                if state.next_ckpt is not None and state.samples >= state.next_ckpt:
                    while state.next_ckpt <= state.samples:
                        state.next_ckpt += r.ckpt_every
                    _checkpoint_now(run, state, clock)
    finally:
        run.progress.close()
    return _finish(run, state, plan, stopped or "budget", error, clock, dense)


def evaluate(run: Run, use_ema: bool = False) -> float:
    """The workload's metric on the current weights (or on the weight EMA)."""
    model = run.raw_model
    model.eval()
    with run.autocast(), (run.ema.applied(model) if use_ema else contextlib.nullcontext()):
        value = float(run.wl.evaluate(model, run.device))
    model.train()
    return value


def _better(run: Run, a: float, b: float) -> bool:
    return a >= b if run.wl.higher_is_better else a <= b


def watched_targets(cfg: TrainConfig) -> list[float]:
    """The targets whose first crossing a run records: ``target`` and ``record_targets``."""
    return sorted({float(t) for t in cfg.record_targets} | ({float(cfg.target)} if cfg.target is not None else set()))


def record_eval(run: Run, state: RunState, value: float, located: dict[float, dict[str, Any]] | None = None) -> bool:
    """Log an evaluation (and the EMA's) and the targets it shows crossed for the first time;
    True when the stopping target is reached now.

    ``located``: crossings that a dense replay placed before this evaluation (dense.py); any
    other new crossing is placed here, its resolution the gap to the previous evaluation.
    """
    state.last_metric = value
    if state.best_metric is None or _better(run, value, state.best_metric):
        state.best_metric = value
    name = run.wl.metric_name
    rec = {"kind": "eval", "step": state.step, "samples": state.samples, name: value}
    if run.ema is not None:
        rec[f"ema_{name}"] = state.ema_metric = evaluate(run, use_ema=True)
    run.metrics.write(rec)
    done = {c["target"] for c in state.crossings}
    for t in watched_targets(run.cfg):
        if t in done or not _better(run, value, t):
            continue
        c = (located or {}).get(t) or {
            "step": state.step, "samples": state.samples, "prev_step": state.last_eval_step or 0,
            "prev_samples": state.last_eval_samples or 0, "b_simple": None}
        b = c["b_simple"] if c["b_simple"] is not None else (state.b_simple_log[-1] if state.b_simple_log else None)
        state.crossings.append({
            "target": t, "steps": c["step"], "samples": c["samples"],
            "resolution": (c["samples"] - c["prev_samples"]) / c["samples"] if c["samples"] else 0.0,
            "resolution_steps": c["step"] - c["prev_step"], "b_simple_at_target": b})
    state.last_eval_step, state.last_eval_samples = state.step, state.samples
    target = run.cfg.target
    hit = target is not None and state.steps_to_target is None and _better(run, value, target)
    if hit:
        c = next(c for c in state.crossings if c["target"] == float(target))
        state.steps_to_target, state.samples_to_target = c["steps"], c["samples"]
        state.b_simple_at_target = c["b_simple_at_target"]
    return hit


def _dense_eval(run: Run) -> DenseEval | None:
    """The dense evaluation of ``target_resolution``, when it is set and a target is watched."""
    targets = watched_targets(run.cfg)
    if run.cfg.target_resolution is None or not targets:
        return None
    return DenseEval(run, targets, lambda a, b: _better(run, a, b), lambda: evaluate(run))


def _record(run: Run, state: RunState, plan: BatchPlan, value: float, dense: DenseEval | None) -> bool:
    """``record_eval`` with the crossings located densely first (when asked); keeps the snapshot."""
    located = dense.locate(state, plan, value) if dense is not None and math.isfinite(value) else None
    hit = record_eval(run, state, value, located)
    if dense is not None:
        dense.evaluated(state, plan)
    return hit


def _evaluate_due(run: Run, state: RunState, plan: BatchPlan, dense: DenseEval | None = None) -> str | None:
    """The evaluation at a sample boundary: "diverged", "target", "stalled" or None (go on)."""
    while state.next_eval <= state.samples:
        state.next_eval += run.r.eval_every
    value = evaluate(run)
    run.progress.update(state.samples, {run.wl.metric_name: value}, force=True)
    if not math.isfinite(value):
        return "diverged"
    if _record(run, state, plan, value, dense) and run.cfg.target is not None:
        return "target"
    return "stalled" if _stalled(run, state) else None


#: Progress is the fraction of the way from the first evaluation to the target: a metric that
#: only jitters around its starting value (chance accuracy) makes none, nor one that fell back
#: there after learning (a run that blew up without a non-finite value).
STALL_PROGRESS = 0.05


def _stalled(run: Run, state: RunState) -> bool:
    """``stall_fraction`` of the budget is spent and the latest evaluation shows no progress from
    the one at step 0 (less than ``STALL_PROGRESS`` of the way to the target; without a target:
    not better than it)."""
    frac, first, last, target = run.cfg.stall_fraction, state.initial_metric, state.last_metric, run.cfg.target
    if frac is None or first is None or last is None:
        return False
    spent = state.samples / run.r.budget
    if run.cfg.max_steps is not None:
        spent = max(spent, state.step / run.cfg.max_steps)
    if spent < frac:
        return False
    if target is None or target == first:
        return not (last != first and _better(run, last, first))
    return (last - first) / (target - first) < STALL_PROGRESS


def log_interval(run: Run, state: RunState, plan: BatchPlan, batch: int, interval: Interval) -> bool:
    """Write a train record for the steps since the last one (the only per-interval host sync).

    ``batch`` is the batch the last step trained at (``plan`` may already be the next one).
    Returns False when the loss is not finite.
    """
    loss_t, count = interval.loss.clone(), float(interval.count)
    if run.info.enabled:
        packed = torch.stack([loss_t, torch.tensor(count, device=run.device)])
        dist.all_reduce(packed)
        loss_t, count = packed[0], float(packed[1])
    loss = float(loss_t) / max(count, 1.0)
    dt = (time.perf_counter() - interval.t0) / interval.steps
    rec = {"kind": "train", "step": state.step, "samples": state.samples, "epoch": state.samples / run.wl.dataset_size,
           "loss": loss, "lr": run.lr, "batch_size": batch, "accum_steps": plan.accum_steps, "step_time": dt,
           "samples_per_s": batch / dt}
    if run.wl.count_unit == "tokens":
        rec["tokens_per_s"] = count / interval.steps / dt
    shown = {"loss": loss, "lr": run.lr, run.wl.metric_name: state.last_metric, "batch": batch}
    if run.monitor is not None:
        est = run.monitor.estimator
        rec.update(b_simple=est.b_simple, grad_sqnorm=est.grad_sqnorm, trace_sigma=est.trace_sigma)
        if run.reading is not None and run.reading.b_simple_samples is not None:
            rec["b_simple_samples"] = run.reading.b_simple_samples
        b = rec.get("b_simple_samples", rec["b_simple"])
        if math.isfinite(b) and b > 0:
            state.b_simple_log.append(b)
        shown["B_simple"] = b
    run.metrics.write(rec)
    run.progress.update(state.samples, shown)
    interval.reset()
    return math.isfinite(loss)


def save_checkpoint(run: Run, state: RunState) -> None:
    """Write ``ckpt_<step>.pt`` (full, unsharded state; a collective under FSDP) and drop old ones."""
    info = run.info
    if not info.is_main and not run.sharded:
        return
    model_sd = full_model_state(run.raw_model)  # a collective under FSDP
    optim_sd = full_optimizer_state(run.raw_model, run.optimizer)
    ema_sd = None if run.ema is None else run.ema.state_dict()  # full tensors; a collective under FSDP
    if not info.is_main:
        return
    ck = Checkpoint(state=state, model=model_sd, optimizer=optim_sd, sampler=run.sampler.state_dict(), rng=rng_state(),
                    config=run.cfg.to_dict(), controller=None if run.controller is None else run.controller.state_dict(),
                    ema=ema_sd, noise=None if run.monitor is None else run.monitor.state_dict())
    save_atomic(ck.to_dict(), run.ckpt_dir / f"ckpt_{state.step:08d}.pt")
    keep = max(run.cfg.keep_checkpoints, run.cfg.average_last, 1)
    for old in list_checkpoints(run.ckpt_dir)[:-keep]:
        old.unlink()


def _checkpoint_now(run: Run, state: RunState, clock: list[float]) -> None:
    """A checkpoint with the wall clock so far folded into the state it saves."""
    now = time.perf_counter()
    state.wall_before += now - clock[0]
    clock[0] = now
    save_checkpoint(run, state)


def _evaluate_average(run: Run) -> dict[str, Any]:
    """Average the last N checkpoints (Popel & Bojar 2018), save it, and evaluate it next to the final weights.

    Rank 0 wrote the checkpoints and deleted the old ones: every rank waits for that before it
    lists them (a rank that did not could read a list with a file already gone). Under FSDP rank
    0 alone averages and its full state is scattered into the shards; the weights are put back
    from a copy of this rank's shards.
    """
    info, model = run.info, run.raw_model
    if info.enabled:
        dist.barrier()
    names: list[str] = []
    avg: dict[str, Any] = {}
    if info.is_main or not run.sharded:
        paths = last_checkpoints(run.ckpt_dir, run.cfg.average_last, allow_fewer=True)
        names = [p.name for p in paths]
        avg = average_checkpoints(paths)
    if info.is_main:
        save_atomic(avg, run.out / "averaged.pt")
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}  # this rank's shards under FSDP
    if run.sharded:
        load_full_model_state(model, avg, from_rank0=True)
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    else:
        model.load_state_dict(avg)
    value = evaluate(run)
    model.load_state_dict(backup)
    return {"averaged_metric": value, "averaged_checkpoints": names}


def _unsharded_copy(wl: Workload, sharded: nn.Module, device: torch.device) -> nn.Module:
    """A plain model holding the FSDP-sharded model's full weights (gathered on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Not cpu_offload: that variant hands the full state to rank 0 only.
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model = wl.build_model()
    model.load_state_dict(state)
    return model.to(device)


def _finish(run: Run, state: RunState, plan: BatchPlan, stopped: str, error: str | None, clock: list[float],
            dense: DenseEval | None = None) -> TrainResult:
    """Final checkpoint (or the divergence message), checkpoint average, summary; the process group ends."""
    wall = state.wall_before + time.perf_counter() - clock[0]
    if stopped != "diverged" and (refused := refused_steps(run, state)) is not None:
        stopped, error = "diverged", refused
    if stopped in ("budget", "target", "max_steps", "stalled"):
        state.wall_before = wall
        clock[0] = time.perf_counter()
        save_checkpoint(run, state)
        if stopped == "stalled":
            run.say(f"stopped at step {state.step}: after {run.cfg.stall_fraction:.0%} of the budget (--stall-fraction) "
                    f"{run.wl.metric_name} is {state.last_metric:.4g}, no progress from the first "
                    f"evaluation's {state.initial_metric:.4g} (best {state.best_metric:.4g})")
    elif stopped == "diverged":
        run.say(f"training diverged at step {state.step} ({error or 'non-finite loss or metric'}); "
                f"the last good checkpoint is kept in {run.ckpt_dir}")
    averaged = _evaluate_average(run) if run.cfg.average_last > 0 and stopped != "diverged" else None
    run.metrics.close()
    summary = summarise(run, state, plan, stopped, wall, averaged)
    if dense is not None:
        summary.update(dense_replays=dense.replays, dense_replayed_steps=dense.replayed_steps)
    if run.info.is_main:
        write_json_atomic(summary, run.out / "summary.json")
    model = run.raw_model
    if run.sharded:  # the returned model must be usable after the group is gone
        model = _unsharded_copy(run.wl, model, run.device)
    shutdown_distributed(run.info)
    return TrainResult(summary=summary, model=model)


def summarise(run: Run, state: RunState, plan: BatchPlan, stopped: str, wall: float,
              averaged: dict[str, Any] | None) -> dict[str, Any]:
    """The run's summary (``summary.json``)."""
    cfg, wl, info = run.cfg, run.wl, run.info
    summary = {
        "workload": getattr(wl, "name", cfg.workload), "metric_name": wl.metric_name,
        "higher_is_better": wl.higher_is_better, "final_metric": state.last_metric, "best_metric": state.best_metric,
        "target": cfg.target, "reached_target": state.steps_to_target is not None,
        "steps_to_target": state.steps_to_target, "samples_to_target": state.samples_to_target,
        "steps": state.step, "samples": state.samples, "epochs": state.samples / wl.dataset_size,
        "batch_size": plan.batch_size, "micro_batch_size": plan.micro_batch_size, "accum_steps": plan.accum_steps,
        "world_size": info.world_size, "parallel": ("fsdp" if cfg.fsdp else "ddp") if info.enabled else "none",
        "batch_changes": state.batch_changes, "optimizer": run.r.optimizer,
        "lr": run.scaling.recipe_for(plan.batch_size).lr, "base_lr": run.r.lr, "base_batch_size": run.r.base_batch,
        "rule": run.scaling.rule, "stopped": stopped, "diverged": stopped == "diverged", "wall_seconds": wall,
        "resumed_from": run.resumed_from, "device": str(run.device), "config": cfg.to_dict(),
        "crossings": list(state.crossings), "target_resolution": cfg.target_resolution,
        "resolution": next((c["resolution"] for c in state.crossings if cfg.target is not None
                            and c["target"] == float(cfg.target)), None),
    }
    if run.monitor is not None:
        blog = state.b_simple_log
        summary["b_simple"] = blog[-1] if blog else None
        summary["b_simple_median"] = float(sorted(blog)[len(blog) // 2]) if blog else None
        summary["b_simple_at_target"] = state.b_simple_at_target
        summary["noise_mode"] = run.monitor.mode
    if run.ema is not None:
        summary["ema_metric"] = state.ema_metric
        summary["ema_horizon_samples"] = cfg.ema_horizon_samples
    if averaged is not None:
        summary.update(averaged)
    return summary

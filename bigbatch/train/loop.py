"""The reference training loop: one loop for CPU, one GPU and torchrun DDP.

Read it top to bottom (nanoGPT style): set-up, then for each optimizer step — draw the global
batch, realise it as micro-batches × accumulation steps × ranks, forward/backward with the loss
normalised by the *global* count (examples or tokens) so the accumulated gradient equals the
big-batch gradient exactly, optimizer step, then logging, evaluation and checkpoints at
sample-count boundaries. Time is counted in samples (DESIGN.md §2).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigbatch._checks import check_int_positive, check_positive
from bigbatch.adaptive import ControllerState, create_controller
from bigbatch.averaging import EMA, average_checkpoints, last_checkpoints
from bigbatch.noise import NoiseMonitor, select_mode
from bigbatch.optim import create_optimizer
from bigbatch.scaling import Recipe, ScalingPlan
from bigbatch.train.checkpoint import latest_checkpoint, list_checkpoints, rng_state, save_atomic, set_rng_state, write_json_atomic
from bigbatch.train.config import TrainConfig
from bigbatch.train.dist import DistInfo, init_distributed, shutdown_distributed
from bigbatch.train.parallel import full_model_state, full_optimizer_state, gradient_sync, load_full_model_state, load_full_state, wrap_model
from bigbatch.train.metrics import MetricsWriter, ProgressDisplay, truncate_metrics
from bigbatch.workloads import Workload, load_workload, move_batch

__all__ = ["train", "TrainResult", "BatchPlan", "plan_batch"]


def _parse_fault(spec: str | None) -> tuple[int, int] | None:
    """``BIGBATCH_TEST_FAULT=rank:step`` makes that rank fail once at that step (tests the restart path)."""
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)



@dataclass(frozen=True, slots=True)
class BatchPlan:
    """How a global batch is realised: ``batch = micro × accum × world``."""

    batch_size: int
    micro_batch_size: int
    accum_steps: int
    world_size: int


def plan_batch(batch_size: int, world_size: int, micro_batch_size: int | None) -> BatchPlan:
    """Split ``batch_size`` over ranks and accumulation steps, or say which option is wrong."""
    batch_size = check_int_positive("batch_size", batch_size)
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the world size {world_size}")
    per_rank = batch_size // world_size
    micro = per_rank if micro_batch_size is None else check_int_positive("micro_batch_size", micro_batch_size)
    if micro > per_rank:
        micro = per_rank
    if per_rank % micro:
        raise ValueError(
            f"--micro-batch-size {micro} does not divide the per-rank batch {per_rank} "
            f"(batch size {batch_size} over {world_size} rank(s))"
        )
    return BatchPlan(batch_size, micro, per_rank // micro, world_size)


@dataclass(slots=True)
class TrainResult:
    """What ``train`` returns (also written to ``summary.json``)."""

    summary: dict[str, Any]
    model: nn.Module


class _Resolved:
    """The config with workload defaults filled in and validated."""

    def __init__(self, cfg: TrainConfig, wl: Workload) -> None:
        d = wl.defaults
        self.batch_size = check_int_positive("batch_size", cfg.batch_size or d.batch_size)
        self.lr = check_positive("lr", cfg.lr if cfg.lr is not None else d.lr)
        self.optimizer = cfg.optimizer or d.optimizer
        self.momentum = d.momentum if cfg.momentum is None else cfg.momentum
        self.weight_decay = d.weight_decay if cfg.weight_decay is None else cfg.weight_decay
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.optimizer_args = {**d.extra, **cfg.optimizer_args} if self.optimizer == d.optimizer else dict(cfg.optimizer_args)
        if cfg.budget_epochs is not None:
            self.budget = int(round(check_positive("budget_epochs", cfg.budget_epochs) * wl.dataset_size))
        else:
            self.budget = check_int_positive("budget_samples", cfg.budget_samples or d.budget_samples)
        # A workload's default warmup is cut to a short budget; a warmup the user asked for is not.
        self.warmup = min(d.warmup_samples, self.budget) if cfg.warmup_samples is None else int(cfg.warmup_samples)
        if self.warmup < 0:
            raise ValueError(f"warmup_samples must be >= 0, got {self.warmup}")
        if cfg.eval_every_samples is not None:
            self.eval_every = check_int_positive("eval_every_samples", cfg.eval_every_samples)
        else:
            self.eval_every = max(self.batch_size, self.budget // 20)
        ck = cfg.checkpoint_every_samples
        self.ckpt_every = self.eval_every if ck is None else int(ck)
        if self.ckpt_every < 0:
            raise ValueError(f"checkpoint_every_samples must be >= 0, got {ck}")
        self.log_every = check_int_positive("log_every_steps", cfg.log_every_steps)
        self.base_batch = cfg.base_batch_size or self.batch_size
        if cfg.target is not None and not math.isfinite(cfg.target):
            raise ValueError(f"target must be a finite number, got {cfg.target}")


def _scaling_plan(r: _Resolved, cfg: TrainConfig, wl: Workload) -> ScalingPlan:
    """The run's recipe at its base batch, and the rule that moves it to any batch size."""
    args = r.optimizer_args
    recipe = Recipe.from_samples(
        dataset_size=wl.dataset_size,
        batch_size=r.base_batch,
        lr=r.lr,
        optimizer=r.optimizer,
        momentum=r.momentum if r.optimizer in ("sgd", "lars") else None,
        betas=tuple(args["betas"]) if "betas" in args else None,
        eps=args.get("eps"),
        weight_decay=r.weight_decay,
        warmup_samples=r.warmup,
        budget_samples=r.budget,
        schedule=cfg.schedule,
    )
    return ScalingPlan(recipe, cfg.rule)


def _apply_hparams(optimizer: torch.optim.Optimizer, scaling: ScalingPlan, batch_size: int, done: int | None) -> int:
    """Set the rule's momentum/betas/eps for ``batch_size`` (adam-sqrt moves them) once per change."""
    if batch_size != done:
        hp = scaling.hparams_for(batch_size)
        for g in optimizer.param_groups:
            for key in ("momentum", "betas", "eps"):
                if key in g and hp.get(key) is not None:
                    g[key] = hp[key]
    return batch_size


@contextlib.contextmanager
def _measure(monitor: NoiseMonitor | None, wl: Workload, mb: dict):
    """The noise monitor's micro-batch bracket (examples and loss units both known to it)."""
    if monitor is None:
        yield
        return
    samples = None
    if wl.count_unit != "examples":
        samples = next(iter(v for v in mb.values() if torch.is_tensor(v))).shape[0]
    with monitor.micro_batch(wl.count(mb), samples=samples):
        yield


def _controller_state(monitor: NoiseMonitor | None, state: dict, batch_size: int) -> ControllerState:
    """Noise readings in examples (the unit of the batch size), for the batch-size controller.

    With a token-normalised loss the estimator counts tokens; the monitor's running tokens per
    example converts B_simple and tr(Σ) alike, so that B_simple = tr(Σ)/|G|² still holds.
    """
    base = ControllerState(samples=state["samples"], batch_size=batch_size, step=state["step"])
    if monitor is None or monitor.estimator.n_updates == 0:
        return base
    est = monitor.estimator
    g2, tr, b = est.grad_sqnorm, est.trace_sigma, est.b_simple
    ups = monitor.units_per_sample  # nan when the loop never said how many examples a micro-batch held
    if math.isfinite(ups) and ups > 0:
        b, tr = b / ups, tr / ups
    return ControllerState(samples=state["samples"], batch_size=batch_size, step=state["step"],
                           b_simple=b, grad_sqnorm=g2, trace_sigma=tr)


def _evaluate_average(cfg: TrainConfig, info: DistInfo, raw_model: nn.Module, ckpt_dir: Path, out: Path, evaluate,
                      sharded: bool) -> dict[str, Any]:
    """Average the last N checkpoints (Popel & Bojar 2018), save it, and evaluate it next to the final weights.

    Under FSDP rank 0 alone (the writer of the checkpoints) averages them and its full state is
    scattered into the shards; the weights are put back from a copy of this rank's shards.
    """
    names: list[str] = []
    avg: dict[str, Any] = {}
    if info.is_main or not sharded:
        paths = last_checkpoints(ckpt_dir, cfg.average_last, allow_fewer=True)
        names = [p.name for p in paths]
        avg = average_checkpoints(paths)
    if info.is_main:
        save_atomic(avg, out / "averaged.pt")
    backup = {k: v.detach().clone() for k, v in raw_model.state_dict().items()}  # this rank's shards under FSDP
    if sharded:
        load_full_model_state(raw_model, avg, from_rank0=True)
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    else:
        raw_model.load_state_dict(avg)
    value = evaluate()
    raw_model.load_state_dict(backup)
    return {"averaged_metric": value, "averaged_checkpoints": names}


def _unsharded_copy(wl: Workload, sharded: nn.Module, device: torch.device) -> nn.Module:
    """A plain model holding the FSDP-sharded model's full weights (gathered on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Not cpu_offload: that variant hands the full state to rank 0 only.
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model = wl.build_model()
    model.load_state_dict(state)
    return model.to(device)


def _prepare_out(out: str | Path, is_main: bool) -> Path:
    path = Path(out)
    if is_main:
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {path} is not a writable directory: {e.strerror or e}") from None
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def train(cfg: TrainConfig, workload: Workload | None = None) -> TrainResult:
    """Run one training run as configured; returns the summary and the trained model."""
    info, device = init_distributed(cfg.device)
    wl = workload if workload is not None else load_workload(cfg.workload, **cfg.workload_args)
    r = _Resolved(cfg, wl)
    plan = plan_batch(r.batch_size, info.world_size, cfg.micro_batch_size)
    scaling = _scaling_plan(r, cfg, wl)
    out = _prepare_out(cfg.out, info.is_main)
    ckpt_dir = out / "checkpoints"

    torch.manual_seed(cfg.seed)
    raw_model = wl.build_model().to(device)
    strategy = "fsdp" if cfg.fsdp else "ddp"
    sharded = strategy == "fsdp" and info.enabled
    if sharded:  # FSDP2 shards in place; the optimizer must then see the sharded parameters
        wrap_model(raw_model, info, device, "fsdp", wl)
    momentum_kw = {"momentum": r.momentum} if r.optimizer in ("sgd", "lars") else {}
    peak = scaling.recipe_for(plan.batch_size).lr
    optimizer = create_optimizer(r.optimizer, raw_model, lr=peak, weight_decay=r.weight_decay, **momentum_kw, **r.optimizer_args)
    for g in optimizer.param_groups:  # groups may carry their own LR; keep their ratio to the peak
        g.setdefault("lr_ratio", g["lr"] / peak)
    controller = None
    if cfg.adaptive:
        # The batch changes through accumulation steps when the micro-batch is fixed, else through
        # the micro-batch itself; either way it must stay a multiple of this.
        granularity = (cfg.micro_batch_size or 1) * info.world_size
        controller = create_controller(cfg.adaptive, **{"granularity": granularity, **cfg.adaptive_args})
    # Under FSDP the EMA is kept as shards of the parameters' layout (built after fully_shard).
    ema = EMA(raw_model, horizon_samples=cfg.ema_horizon_samples) if cfg.ema_horizon_samples else None
    sampler = wl.sampler(cfg.seed)

    # ---- resume -------------------------------------------------------------------------
    state: dict[str, Any] = {
        "step": 0,
        "samples": 0,
        "next_eval": 0,
        "next_ckpt": r.ckpt_every if r.ckpt_every > 0 else None,
        "best_metric": None,
        "last_metric": None,
        "steps_to_target": None,
        "samples_to_target": None,
        "wall_before": 0.0,
        "batch_size": plan.batch_size,
        "batch_changes": 0,
        "b_simple_log": [],
    }
    resumed_from = None
    # torchrun --max-restarts: a restarted worker continues from the newest checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    fault = _parse_fault(os.environ.get("BIGBATCH_TEST_FAULT"))
    resume = cfg.resume or restarted
    blob = None
    if resume and (ck := latest_checkpoint(ckpt_dir)) is not None:
        blob = torch.load(ck, map_location="cpu" if sharded else device, weights_only=False)
        load_full_state(raw_model, optimizer, blob["model"], blob["optimizer"])
        sampler.load_state_dict(blob["sampler"])
        state.update(blob["state"])
        if controller is not None and blob.get("controller") is not None:
            controller.load_state_dict(blob["controller"])
        if ema is not None and blob.get("ema") is not None:
            ema.load_state_dict(blob["ema"])
        set_rng_state(blob["rng"])
        resumed_from = str(ck)
        if info.is_main:
            truncate_metrics(out / "metrics.jsonl", state["step"])
    if not resume and info.is_main:
        for old in list_checkpoints(ckpt_dir):
            old.unlink()
        (out / "metrics.jsonl").unlink(missing_ok=True)

    if controller is not None and state["step"] == 0:  # the controller's start size (min batch, ramp start)
        state["batch_size"] = controller.next_batch_size(ControllerState(samples=0, batch_size=plan.batch_size))
    if state["batch_size"] != plan.batch_size:
        plan = plan_batch(state["batch_size"], info.world_size, cfg.micro_batch_size)
    hparams_batch = _apply_hparams(optimizer, scaling, plan.batch_size, None)

    model: nn.Module = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if info.enabled and not sharded:
        model = wrap_model(model, info, device, "ddp", wl)
    monitor = None
    if cfg.noise_scale:
        mode = cfg.noise_mode
        if mode == "auto":
            mode = select_mode(sharded=sharded, ddp=info.enabled and not sharded, accum_steps=plan.accum_steps)
        every = cfg.noise_every or (10 if device.type == "cuda" else 1)
        monitor = NoiseMonitor(model, mode=mode, beta=cfg.noise_beta, every=every)
        if blob is not None and blob.get("noise") is not None:  # the monitor needs the wrapped model first
            monitor.load_state_dict(blob["noise"])
    use_amp = cfg.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

    metrics = MetricsWriter(out / "metrics.jsonl", enabled=info.is_main)
    higher = wl.higher_is_better
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    progress = ProgressDisplay(cfg.progress, r.budget, getattr(wl, "name", cfg.workload), enabled=info.is_main)

    def evaluate(use_ema: bool = False) -> float:
        raw_model.eval()
        with autocast(), (ema.applied(raw_model) if use_ema else contextlib.nullcontext()):
            value = float(wl.evaluate(raw_model, device))
        raw_model.train()
        return value

    def checkpoint() -> None:
        if not info.is_main and not sharded:
            return
        model_sd = full_model_state(raw_model)  # a collective under FSDP
        optim_sd = full_optimizer_state(raw_model, optimizer)
        ema_sd = None if ema is None else ema.state_dict()  # full tensors; a collective under FSDP
        if not info.is_main:
            return
        blob = {
            "model": model_sd,
            "optimizer": optim_sd,
            "sampler": sampler.state_dict(),
            "state": dict(state),
            "rng": rng_state(),
            "controller": None if controller is None else controller.state_dict(),
            "ema": ema_sd,
            "noise": None if monitor is None else monitor.state_dict(),
            "step": state["step"],
            "samples": state["samples"],
            "config": cfg.to_dict(),
        }
        save_atomic(blob, ckpt_dir / f"ckpt_{state['step']:08d}.pt")
        keep = max(cfg.keep_checkpoints, cfg.average_last, 1)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink()

    def record_eval(value: float) -> bool:
        """Log an evaluation; True when the target is reached now."""
        state["last_metric"] = value
        if state["best_metric"] is None or better(value, state["best_metric"]):
            state["best_metric"] = value
        rec = {"kind": "eval", "step": state["step"], "samples": state["samples"], wl.metric_name: value}
        if ema is not None:
            rec[f"ema_{wl.metric_name}"] = state["ema_metric"] = evaluate(use_ema=True)
        metrics.write(rec)
        hit = cfg.target is not None and state["steps_to_target"] is None and better(value, cfg.target)
        if hit:
            state["steps_to_target"], state["samples_to_target"] = state["step"], state["samples"]
            if state["b_simple_log"]:
                state["b_simple_at_target"] = state["b_simple_log"][-1]
        return hit

    reading = None
    nonfinite_error = None

    # ---- the loop -----------------------------------------------------------------------
    t_start = time.perf_counter()
    stopped = "budget"
    steps_this_run = 0
    interval_loss = torch.zeros((), device=device)
    interval_count = 0
    interval_t0 = time.perf_counter()
    interval_steps = 0
    model.train()
    try:
        if state["samples"] == 0 and state["next_eval"] == 0:
            state["next_eval"] = r.eval_every
            if record_eval(evaluate()):
                stopped = "target"
        while stopped != "target" and state["samples"] < r.budget:
            if cfg.max_steps is not None and steps_this_run >= cfg.max_steps:
                stopped = "max_steps"
                break
            batch_size = plan.batch_size
            indices = sampler.next(batch_size)
            per_rank = batch_size // info.world_size
            local = indices[info.rank * per_rank : (info.rank + 1) * per_rank]
            micro = [
                move_batch(wl.fetch(local[i * plan.micro_batch_size : (i + 1) * plan.micro_batch_size]), device)
                for i in range(plan.accum_steps)
            ]
            n_local = sum(wl.count(mb) for mb in micro)
            if info.enabled:
                # A pinned, non-blocking copy: torch.tensor(x, device=cuda) from pageable memory
                # would wait for the GPU to drain every step and cost the CPU its run-ahead.
                n_global = torch.tensor([float(n_local)], pin_memory=device.type == "cuda")[0]
                n_global = n_global.to(device, non_blocking=True)
                dist.all_reduce(n_global)  # stays on the device: no host sync
            else:
                n_global = float(n_local)
            # DDP averages gradients over ranks; scaling by world/N makes the result Σ loss / N.
            scale = info.world_size / n_global

            hparams_batch = _apply_hparams(optimizer, scaling, batch_size, hparams_batch)
            # The LR of the step that ends at samples + batch: the schedule runs in samples, so a
            # batch change keeps its position and only the rule's factor for the new batch moves.
            lr = scaling.lr_at(state["samples"] + batch_size, batch_size)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_ratio"]

            if monitor is not None:
                monitor.begin_step()
                if monitor.mode == "split":
                    micro = [piece for mb in micro for piece in monitor.split_batch(mb)]
            for i, mb in enumerate(micro):
                sync = not info.enabled or i == len(micro) - 1
                with gradient_sync(model, sync), _measure(monitor, wl, mb):
                    with autocast():
                        loss_sum, _ = wl.loss(model, mb)
                    (loss_sum * scale).backward()
                interval_loss += loss_sum.detach().float()
            if monitor is not None:
                reading = monitor.end_step()
            interval_count += n_local
            try:
                optimizer.step()
            except FloatingPointError as e:  # LARS/LAMB/MERIT refuse a non-finite gradient, state untouched
                stopped = "diverged"
                nonfinite_error = str(e)
                break
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model, batch_size)
            if fault is not None and not restarted and fault == (info.rank, state["step"] + 1):
                raise RuntimeError(f"injected fault on rank {info.rank} at step {state['step'] + 1} (BIGBATCH_TEST_FAULT)")
            state["step"] += 1
            state["samples"] += batch_size
            steps_this_run += 1
            interval_steps += 1
            log_step = state["step"] % r.log_every == 0

            # ---- adaptive batch size: realised by accumulation steps / micro-batch ----------
            if controller is not None:
                # Noise readings are handed over on log steps only, where they are fetched from the
                # device anyway: no extra host sync in the loop (a ramp needs none at all).
                new = controller.next_batch_size(_controller_state(monitor if log_step else None, state, batch_size))
                if new != batch_size:
                    plan = plan_batch(new, info.world_size, cfg.micro_batch_size)
                    state["batch_size"] = plan.batch_size
                    state["batch_changes"] += 1
                    reason = controller.changes[-1].reason if controller.changes else ""
                    metrics.write({"kind": "batch_size", "step": state["step"], "samples": state["samples"],
                                   "old": batch_size, "new": plan.batch_size, "accum_steps": plan.accum_steps,
                                   "micro_batch_size": plan.micro_batch_size, "reason": reason})

            # ---- logging (the only per-interval host sync) -----------------------------
            if log_step or state["samples"] >= r.budget:
                loss_t = interval_loss.clone()
                if info.enabled:
                    packed = torch.stack([loss_t, torch.tensor(float(interval_count), device=device)])
                    dist.all_reduce(packed)
                    loss_t, count = packed[0], float(packed[1])
                else:
                    count = float(interval_count)
                loss = float(loss_t) / max(count, 1.0)
                dt = (time.perf_counter() - interval_t0) / interval_steps
                rec = {
                    "kind": "train",
                    "step": state["step"],
                    "samples": state["samples"],
                    "epoch": state["samples"] / wl.dataset_size,
                    "loss": loss,
                    "lr": lr,
                    "batch_size": batch_size,
                    "accum_steps": plan.accum_steps,
                    "step_time": dt,
                    "samples_per_s": batch_size / dt,
                }
                if wl.count_unit == "tokens":
                    rec["tokens_per_s"] = count / interval_steps / dt
                if monitor is not None:
                    est = monitor.estimator
                    noise = {"b_simple": est.b_simple, "grad_sqnorm": est.grad_sqnorm, "trace_sigma": est.trace_sigma}
                    if reading is not None and reading.b_simple_samples is not None:
                        noise["b_simple_samples"] = reading.b_simple_samples
                    rec.update(noise)
                    b = noise.get("b_simple_samples", noise["b_simple"])
                    if math.isfinite(b) and b > 0:
                        state["b_simple_log"].append(b)
                metrics.write(rec)
                shown = {"loss": loss, "lr": lr, wl.metric_name: state["last_metric"], "batch": batch_size}
                if monitor is not None:
                    shown["B_simple"] = rec.get("b_simple_samples", rec["b_simple"])
                progress.update(state["samples"], shown)
                interval_loss.zero_()
                interval_count, interval_steps, interval_t0 = 0, 0, time.perf_counter()
                if not math.isfinite(loss):
                    stopped = "diverged"
                    break

            # ---- evaluation, target, checkpoints at sample boundaries ------------------
            if state["samples"] >= state["next_eval"] or state["samples"] >= r.budget:
                while state["next_eval"] <= state["samples"]:
                    state["next_eval"] += r.eval_every
                value = evaluate()
                progress.update(state["samples"], {wl.metric_name: value}, force=True)
                if not math.isfinite(value):
                    stopped = "diverged"
                    break
                if record_eval(value) and cfg.target is not None:
                    stopped = "target"
            if state["next_ckpt"] is not None and state["samples"] >= state["next_ckpt"]:
                while state["next_ckpt"] <= state["samples"]:
                    state["next_ckpt"] += r.ckpt_every
                state["wall_before"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                checkpoint()
    finally:
        progress.close()

    wall = state["wall_before"] + time.perf_counter() - t_start
    if stopped in ("budget", "target", "max_steps"):
        state["wall_before"] = wall
        t_start = time.perf_counter()
        checkpoint()
    elif stopped == "diverged" and info.is_main:
        print(
            f"training diverged at step {state['step']} ({nonfinite_error or 'non-finite loss or metric'}); "
            f"the last good checkpoint is kept in {ckpt_dir}",
            flush=True,
        )
    averaged = None
    if cfg.average_last > 0 and stopped != "diverged":
        averaged = _evaluate_average(cfg, info, raw_model, ckpt_dir, out, evaluate, sharded)
    metrics.close()

    blog = state["b_simple_log"]
    summary = {
        "workload": getattr(wl, "name", cfg.workload),
        "metric_name": wl.metric_name,
        "higher_is_better": higher,
        "final_metric": state["last_metric"],
        "best_metric": state["best_metric"],
        "target": cfg.target,
        "reached_target": state["steps_to_target"] is not None,
        "steps_to_target": state["steps_to_target"],
        "samples_to_target": state["samples_to_target"],
        "steps": state["step"],
        "samples": state["samples"],
        "epochs": state["samples"] / wl.dataset_size,
        "batch_size": plan.batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "accum_steps": plan.accum_steps,
        "world_size": info.world_size,
        "parallel": strategy if info.enabled else "none",
        "batch_changes": state["batch_changes"],
        "optimizer": r.optimizer,
        "lr": scaling.recipe_for(plan.batch_size).lr,
        "base_lr": r.lr,
        "base_batch_size": r.base_batch,
        "rule": scaling.rule,
        "stopped": stopped,
        "diverged": stopped == "diverged",
        "wall_seconds": wall,
        "resumed_from": resumed_from,
        "device": str(device),
        "config": cfg.to_dict(),
    }
    if monitor is not None:
        summary["b_simple"] = blog[-1] if blog else None
        summary["b_simple_median"] = float(sorted(blog)[len(blog) // 2]) if blog else None
        summary["b_simple_at_target"] = state.get("b_simple_at_target")
        summary["noise_mode"] = monitor.mode
    if ema is not None:
        summary["ema_metric"] = state.get("ema_metric")
        summary["ema_horizon_samples"] = cfg.ema_horizon_samples
    if averaged is not None:
        summary.update(averaged)
    if info.is_main:
        write_json_atomic(summary, out / "summary.json")
    if sharded:  # the returned model must be usable after the group is gone
        raw_model = _unsharded_copy(wl, raw_model, device)
    shutdown_distributed(info)
    return TrainResult(summary=summary, model=raw_model)

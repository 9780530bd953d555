"""Setting a run up: the output directory, the components, resuming from a checkpoint.

``setup`` returns a ``Run`` (what does not change while training: the model, the optimizer,
the controller, ...), the ``RunState`` to start from and the first ``BatchPlan``.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bigbatch.adaptive import BatchSizeController, ControllerState, create_controller, load_batch_schedule
from bigbatch.averaging import EMA
from bigbatch.noise import NoiseMonitor, NoiseReading, select_mode
from bigbatch.optim import create_optimizer, optimizer_info
from bigbatch.optim._base import TrustRatioOptimizer
from bigbatch.scaling import Recipe, ScalingPlan
from bigbatch.train.checkpoint import load_newest, remove_run, run_files, set_rng_state
from bigbatch.train.config import Resolved, TrainConfig, resolve
from bigbatch.train.dist import DistInfo, init_distributed
from bigbatch.train.metrics import MetricsWriter, ProgressDisplay, truncate_metrics
from bigbatch.train.parallel import load_full_state, wrap_model
from bigbatch.train.plan import BatchPlan, plan_batch
from bigbatch.train.state import Checkpoint, RunState, check_resume_config
from bigbatch.workloads import Workload, load_workload

__all__ = ["Run", "setup", "seed_everything", "apply_hparams", "noise_mode", "noise_every", "make_monitor"]

@dataclass(slots=True, kw_only=True)
class Run:
    """The parts of a run that training uses but does not save as counters (see ``RunState``)."""

    cfg: TrainConfig
    r: Resolved
    wl: Workload
    info: DistInfo
    device: torch.device
    out: Path
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaling: ScalingPlan
    sampler: Any
    controller: BatchSizeController | None = None
    ema: EMA | None = None
    sharded: bool = False
    restarted: bool = False
    model: nn.Module | None = None  # raw_model as trained: compiled and/or DDP-wrapped
    monitor: NoiseMonitor | None = None
    autocast: Callable[[], Any] = contextlib.nullcontext
    metrics: MetricsWriter | None = None
    progress: ProgressDisplay | None = None
    resumed_from: str | None = None
    hparams_batch: int | None = None  # the batch whose momentum/betas/eps are set in the optimizer
    lr: float = 0.0  # the LR of the last step
    reading: NoiseReading | None = None  # the noise monitor's reading of the last step
    # Fused LARS/LAMB/MERIT on a GPU skip a non-finite step on the device instead of raising (raising
    # needs a host sync every step, which idles the GPU while the host prepares the next step);
    # the loop reads the skip count where it syncs anyway (log_interval) and stops the run there.
    deferred_nonfinite: bool = False
    skipped_seen: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def say(self, line: str) -> None:
        """One line to the user, from rank 0 only."""
        if self.info.is_main:
            print(line, flush=True)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global generator and ``random``: a workload may draw from any of them."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def setup(cfg: TrainConfig, workload: Workload | None = None) -> tuple[Run, RunState, BatchPlan]:
    """Build the run, resume it when asked (or after a torchrun restart), and plan its first batch."""
    info, device = init_distributed(cfg.device)
    wl = workload if workload is not None else load_workload(cfg.workload, **cfg.workload_args)
    r = resolve(cfg, wl)
    plan = plan_batch(r.batch_size, info.world_size, cfg.micro_batch_size)
    # torchrun --max-restarts: a restarted worker continues from the newest checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resuming = cfg.resume or restarted
    out = _prepare_out(cfg, info, resuming)
    seed_everything(cfg.seed)
    run = _build(cfg, r, wl, info, device, out, restarted)
    state, ckpt = _resume(run, plan) if resuming else (_fresh_state(r, plan), None)
    if run.controller is not None and state.step == 0:  # the controller's start size (min batch, ramp start)
        state.batch_size = run.controller.next_batch_size(ControllerState(samples=0, batch_size=plan.batch_size))
    if state.batch_size != plan.batch_size:
        plan = plan_batch(state.batch_size, info.world_size, cfg.micro_batch_size)
    run.hparams_batch = apply_hparams(run.optimizer, run.scaling, plan.batch_size, None)
    _wrap(run, plan, ckpt)
    return run, state, plan


def _prepare_out(cfg: TrainConfig, info: DistInfo, resuming: bool) -> Path:
    """Check ``out`` is writable and holds no run unless resumed or overwritten (never lose a run)."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                         "--overwrite deletes it")
    path = Path(cfg.out)
    if info.is_main:
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {path} is not a writable directory: {e.strerror or e}") from None
    found = [] if resuming else run_files(path)  # every rank looks, so every rank refuses together
    if found and not cfg.overwrite:
        raise ValueError(f"--out {path} already holds a run ({', '.join(p.name for p in found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}); pass --resume to continue it or --overwrite to replace it")
    if found:  # --overwrite; every rank saw the same files (rank 0 writes none of them before this)
        if info.enabled:
            dist.barrier()  # all ranks have looked before rank 0 deletes anything
        if info.is_main:
            remove_run(path)
    return path


def _scaling_plan(r: Resolved, cfg: TrainConfig, wl: Workload) -> ScalingPlan:
    """The run's recipe at its base batch, and the rule that moves it to any batch size."""
    args = r.optimizer_args
    recipe = Recipe.from_samples(
        dataset_size=wl.dataset_size,
        batch_size=r.base_batch,
        lr=r.lr,
        optimizer=r.optimizer,
        momentum=r.momentum if optimizer_info(r.optimizer).takes("momentum") else None,
        betas=tuple(args["betas"]) if "betas" in args else None,
        eps=args.get("eps"),
        weight_decay=r.weight_decay,
        warmup_samples=r.warmup,
        budget_samples=r.budget,
        schedule=cfg.schedule,
    )
    return ScalingPlan(recipe, cfg.rule)


def _build(cfg: TrainConfig, r: Resolved, wl: Workload, info: DistInfo, device: torch.device, out: Path,
           restarted: bool) -> Run:
    """Model, optimizer, controller, EMA and sampler, in the order that fixes the RNG draws."""
    scaling = _scaling_plan(r, cfg, wl)
    raw_model = wl.build_model().to(device)
    sharded = cfg.fsdp and info.enabled
    if sharded:  # FSDP2 shards in place; the optimizer must then see the sharded parameters
        wrap_model(raw_model, info, device, "fsdp", wl)
    momentum_kw = {"momentum": r.momentum} if optimizer_info(r.optimizer).takes("momentum") else {}
    peak = scaling.recipe_for(r.batch_size).lr
    optimizer = create_optimizer(r.optimizer, raw_model, lr=peak, weight_decay=r.weight_decay, **momentum_kw,
                                 **r.optimizer_args)
    for g in optimizer.param_groups:  # groups may carry their own LR; keep their ratio to the peak
        g.setdefault("lr_ratio", g["lr"] / peak)
    deferred = _defers_nonfinite(optimizer)
    if deferred:
        optimizer.nonfinite = "skip"
    controller = None
    name, args = _controller_spec(cfg)
    if name is not None:
        # The batch changes through accumulation steps when the micro-batch is fixed, else through
        # the micro-batch itself; either way it must stay a multiple of this.
        g = (1 if cfg.micro_batch_size is None else cfg.micro_batch_size) * info.world_size
        given = args.get("granularity", g)
        if isinstance(given, bool) or not isinstance(given, int) or given <= 0 or given % g:
            raise ValueError(f"adaptive_args granularity must be a multiple of micro_batch_size x world size = {g} "
                             f"(a batch must hold whole micro-batches), got {given!r}")
        controller = create_controller(name, **{**args, "granularity": given})
    # Under FSDP the EMA is kept as shards of the parameters' layout (built after fully_shard).
    ema = None if cfg.ema_horizon_samples is None else EMA(raw_model, horizon_samples=cfg.ema_horizon_samples)
    return Run(cfg=cfg, r=r, wl=wl, info=info, device=device, out=out, raw_model=raw_model, optimizer=optimizer,
               scaling=scaling, sampler=wl.sampler(cfg.seed), controller=controller, ema=ema, sharded=sharded,
               restarted=restarted, deferred_nonfinite=deferred)


def _defers_nonfinite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the run checks non-finite steps at log points instead of every step (``Run.deferred_nonfinite``)."""
    return (isinstance(optimizer, TrustRatioOptimizer) and optimizer.nonfinite == "raise"
            and any(g.get("fused") for g in optimizer.param_groups))


def _fresh_state(r: Resolved, plan: BatchPlan) -> RunState:
    return RunState(next_ckpt=r.ckpt_every if r.ckpt_every > 0 else None, batch_size=plan.batch_size)


def _resume(run: Run, plan: BatchPlan) -> tuple[RunState, Checkpoint | None]:
    """Load the newest checkpoint that loads into the run; a fresh state when there is none."""
    cfg, info = run.cfg, run.info
    found = load_newest(run.ckpt_dir, map_location="cpu" if run.sharded else run.device, report=run.say)
    if found is None:
        run.say(f"--resume: no checkpoint in {run.ckpt_dir} to resume from; starting a fresh run")
        if info.is_main:
            remove_run(run.out)  # a run killed before its first checkpoint: its metrics start over
        return _fresh_state(run.r, plan), None
    path, ck = found
    defaults = TrainConfig().to_dict()
    check_resume_config(ck.config, cfg.to_dict(), defaults)
    load_full_state(run.raw_model, run.optimizer, ck.model, ck.optimizer)
    run.sampler.load_state_dict(ck.sampler)
    if run.controller is not None and ck.controller is not None:
        run.controller.load_state_dict(ck.controller)
    if run.ema is not None and ck.ema is not None:
        run.ema.load_state_dict(ck.ema)
    set_rng_state(ck.rng)
    run.resumed_from = str(path)
    if info.is_main:
        truncate_metrics(run.out / "metrics.jsonl", ck.state.step)
    state = ck.state
    # checkpoint_every_samples may change on resume: from here on its new value holds.
    if run.r.ckpt_every == 0:
        state.next_ckpt = None
    elif state.next_ckpt is None:
        state.next_ckpt = state.samples + run.r.ckpt_every
    return state, ck


def apply_hparams(optimizer: torch.optim.Optimizer, scaling: ScalingPlan, batch_size: int, done: int | None) -> int:
    """Set the rule's momentum/betas/eps for ``batch_size`` (adam-sqrt moves them) once per change."""
    if batch_size != done:
        hp = scaling.hparams_for(batch_size)
        for g in optimizer.param_groups:
            for key in ("momentum", "betas", "eps"):
                if key in g and hp.get(key) is not None:
                    g[key] = hp[key]
    return batch_size


def _controller_spec(cfg: TrainConfig) -> tuple[str | None, dict[str, Any]]:
    """The controller's name and arguments: ``adaptive``/``adaptive_args``, or the ``batch_schedule``."""
    if cfg.batch_schedule is None:
        return cfg.adaptive, dict(cfg.adaptive_args)
    if cfg.adaptive not in (None, "schedule"):
        raise ValueError(f"batch_schedule sets the batch itself; it cannot be combined with adaptive={cfg.adaptive!r}")
    if "schedule" in cfg.adaptive_args:
        raise ValueError("give the schedule once: batch_schedule or adaptive_args schedule=..., not both")
    return "schedule", {**cfg.adaptive_args, "schedule": load_batch_schedule(cfg.batch_schedule)}


def noise_mode(run: Run, plan: BatchPlan) -> str:
    """The monitor's mode for this batch plan (``noise_mode``, or what ``auto`` means for it)."""
    if run.cfg.noise_mode != "auto":
        return run.cfg.noise_mode
    info = run.info
    return select_mode(sharded=run.sharded, ddp=info.enabled and not run.sharded, accum_steps=plan.accum_steps)


def noise_every(run: Run, mode: str) -> int:
    """Measure one step in this many: ``noise_every``, else every step on CPU; on CUDA one in 10,
    or one in 50 in split mode, whose measured steps run two half batches (about +10% each on
    GPT-2 small on an H200): the default keeps the monitor's cost under 1% (BENCHMARKS.md)."""
    if run.r.noise_every is not None:
        return run.r.noise_every
    if run.device.type != "cuda":
        return 1
    return 50 if mode == "split" else 10


def make_monitor(run: Run, plan: BatchPlan, state: dict[str, Any] | None = None) -> NoiseMonitor:
    """A noise monitor on the trained model for ``plan``, continuing from ``state`` when given."""
    mode = noise_mode(run, plan)
    monitor = NoiseMonitor(run.model, mode=mode, beta=run.cfg.noise_beta, every=noise_every(run, mode))
    if state is not None:
        monitor.load_state_dict(state)
    return monitor


def _wrap(run: Run, plan: BatchPlan, ckpt: Checkpoint | None) -> None:
    """Compile and DDP-wrap the model, attach the noise monitor, open the metrics and the display."""
    cfg, info = run.cfg, run.info
    model: nn.Module = run.raw_model
    if cfg.compile:
        # Static shapes: split-mode noise steps run half batches, and an adaptive batch changes the
        # micro-batch; a few static graphs are faster than one dynamic-shape graph for every step.
        model = torch.compile(model, dynamic=False)
    if info.enabled and not run.sharded:
        model = wrap_model(model, info, run.device, "ddp", run.wl)
    run.model = model
    auto_noise = not cfg.noise_scale and run.controller is not None and run.controller.needs_noise
    if cfg.noise_scale or auto_noise:  # the monitor needs the wrapped model first
        run.monitor = make_monitor(run, plan, None if ckpt is None else ckpt.noise)
    if auto_noise:
        run.say(f"--adaptive {cfg.adaptive} decides from gradient noise readings: measuring them "
                f"(--noise-scale, mode {run.monitor.mode}, one step in {run.monitor.every})")
    if cfg.amp and run.device.type == "cuda":
        run.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    run.metrics = MetricsWriter(run.out / "metrics.jsonl", enabled=info.is_main)
    run.progress = ProgressDisplay(cfg.progress, run.r.budget, getattr(run.wl, "name", cfg.workload), enabled=info.is_main)


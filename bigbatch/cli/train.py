"""``bigbatch train``: one training run of a workload; every flag mirrors a TrainConfig field."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import typer

__all__ = ["register", "train_command", "config_from_options"]


def config_from_options(config: Optional[Path], options: dict[str, Any]):
    """A TrainConfig from an optional TOML file overlaid with the flags the user gave."""
    from bigbatch.train import TrainConfig

    cfg = TrainConfig.from_toml(config) if config is not None else TrainConfig()
    changes = {k: v for k, v in options.items() if v is not None}
    return dataclasses.replace(cfg, **changes)


def train_command(
    workload: Optional[str] = typer.Option(None, help="mnist1d, bytelm, linreg, or module:factory for your own."),
    workload_arg: Optional[list[str]] = typer.Option(None, "--workload-arg", "-w", help="key=value passed to the workload (repeatable), e.g. model=mlp."),
    corpus: Optional[list[Path]] = typer.Option(None, help="bytelm: text files or directories to train on (default: the Python standard library)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size (examples)."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Examples per forward/backward per process (accumulation = batch / (micro × world))."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    optimizer: Optional[str] = typer.Option(None, help="sgd, adamw, lars, lamb, merit."),
    momentum: Optional[float] = typer.Option(None, help="Momentum (sgd, lars)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay."),
    warmup_samples: Optional[int] = typer.Option(None, help="Linear warmup in samples."),
    schedule: Optional[str] = typer.Option(None, help="Decay shape after warmup."),
    rule: Optional[str] = typer.Option(None, help="LR scaling rule from --base-batch-size to the running batch."),
    base_batch_size: Optional[int] = typer.Option(None, help="Batch size at which --lr was tuned."),
    budget_samples: Optional[int] = typer.Option(None, help="Training budget in samples."),
    budget_epochs: Optional[float] = typer.Option(None, help="Training budget in epochs."),
    eval_every_samples: Optional[int] = typer.Option(None, help="Evaluate every N samples."),
    checkpoint_every_samples: Optional[int] = typer.Option(None, help="Checkpoint every N samples (0: only at the end)."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Periodic checkpoints kept on disk."),
    log_every_steps: Optional[int] = typer.Option(None, help="Metrics record every N steps."),
    target: Optional[float] = typer.Option(None, help="Stop when the eval metric reaches this value."),
    seed: Optional[int] = typer.Option(None, help="Seed for init and data order."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--ddp", help="Under torchrun: FSDP2 sharding instead of DDP."),
    nproc: Optional[int] = typer.Option(None, help="Launch torchrun with N processes on this host."),
    max_restarts: Optional[int] = typer.Option(None, help="torchrun restarts after a failure (workers resume from the newest checkpoint)."),
    out: Optional[str] = typer.Option(None, help="Output directory."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the newest checkpoint in --out."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps in this invocation (resumable)."),
    noise_scale: Optional[bool] = typer.Option(None, "--noise-scale/--no-noise-scale", help="Measure B_simple while training."),
    noise_mode: Optional[str] = typer.Option(None, help="Noise-scale source: auto, accumulation, ddp, fsdp, split."),
    noise_every: Optional[int] = typer.Option(None, help="Measure the noise scale on one step in N."),
    noise_beta: Optional[float] = typer.Option(None, help="EMA factor of the noise-scale estimators."),
    ema_horizon_samples: Optional[int] = typer.Option(None, help="Weight EMA with this horizon in samples (evaluated next to the weights)."),
    packing: Optional[str] = typer.Option(None, help="bytelm: pack documents into rows (bfd or spfhp) without cross-document attention."),
    adaptive: Optional[str] = typer.Option(None, help="Adaptive batch size: noise, normtest, ramp."),
    adaptive_arg: Optional[list[str]] = typer.Option(None, "--adaptive-arg", help="key=value for the adaptive controller (repeatable), e.g. max_batch_size=4096."),
    average_last: Optional[int] = typer.Option(None, help="Average the last N checkpoints at the end."),
    progress: Optional[str] = typer.Option(None, help="auto, bar, lines, none."),
    config: Optional[Path] = typer.Option(None, help="TOML file with TrainConfig fields; flags override it."),
) -> None:
    """Train one workload at one batch size; writes metrics.jsonl, checkpoints and summary.json to --out."""
    from bigbatch.train import train
    from bigbatch.workloads import parse_workload_args

    wargs = parse_workload_args(workload_arg or [])
    if corpus:
        for p in corpus:
            if not p.exists():
                raise ValueError(f"--corpus path does not exist: {p}")
        wargs["corpus"] = [str(p) for p in corpus]
    if packing:
        wargs["packing"] = packing
    options = dict(
        workload=workload, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, warmup_samples=warmup_samples, schedule=schedule, rule=rule,
        base_batch_size=base_batch_size, budget_samples=budget_samples, budget_epochs=budget_epochs,
        eval_every_samples=eval_every_samples, checkpoint_every_samples=checkpoint_every_samples,
        keep_checkpoints=keep_checkpoints, log_every_steps=log_every_steps, target=target, seed=seed, device=device,
        amp=amp, compile=compile, fsdp=fsdp, nproc=nproc, max_restarts=max_restarts, out=out, resume=resume, max_steps=max_steps, noise_scale=noise_scale,
        noise_mode=noise_mode, noise_every=noise_every, noise_beta=noise_beta,
        ema_horizon_samples=ema_horizon_samples, adaptive=adaptive, average_last=average_last, progress=progress,
    )
    if lr is not None and not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    cfg = config_from_options(config, options)
    if wargs:
        cfg = dataclasses.replace(cfg, workload_args={**cfg.workload_args, **wargs})
    if adaptive_arg:
        cfg = dataclasses.replace(cfg, adaptive_args={**cfg.adaptive_args, **parse_workload_args(adaptive_arg)})
    if cfg.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {cfg.nproc}")
    if cfg.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {cfg.max_restarts}")
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(_launch_torchrun(cfg.nproc, cfg.max_restarts))
    result = train(cfg)
    s = result.summary
    if s.get("world_size", 1) > 1 and _rank() != 0:
        return
    outdir = Path(cfg.out)
    metric = s["final_metric"]
    shown = "n/a" if metric is None else f"{metric:.4f}"
    typer.echo(
        f"{s['workload']}: {s['metric_name']} {shown} after {s['steps']} steps, {s['samples']} samples "
        f"({s['wall_seconds']:.1f} s, stopped: {s['stopped']})"
    )
    typer.echo(f"metrics:     {outdir / 'metrics.jsonl'}")
    typer.echo(f"checkpoints: {outdir / 'checkpoints'}")
    typer.echo(f"summary:     {outdir / 'summary.json'}")
    if s["diverged"]:
        raise typer.Exit(1)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _strip_option(args: list[str], names: tuple[str, ...]) -> list[str]:
    """Drop ``--name VALUE`` / ``--name=VALUE`` occurrences from an argument list."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


def _launch_torchrun(nproc: int, max_restarts: int) -> int:
    """Re-run this very command under ``torchrun --standalone --nproc-per-node N``."""
    import subprocess
    import sys

    args = _strip_option(sys.argv[1:], ("--nproc", "--max-restarts"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}", "-m", "bigbatch", *args,
    ]
    typer.echo("launching: " + " ".join(cmd[1:]), err=True)
    return subprocess.call(cmd)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


"""``bigbatch train``: one training run of a workload; its flags are generated from TrainConfig.

Every field of :class:`bigbatch.train.TrainConfig` is a flag (``bigbatch/cli/_fields.py`` says
how); ``--fsdp/--ddp`` and ``-w`` are renamed spellings. Flags that are not fields:

* ``--config FILE``: a TOML file of TrainConfig fields, which the flags override;
* ``--corpus PATH`` (repeatable) and ``--packing METHOD``: the bytelm workload's ``corpus`` and
  ``packing`` arguments, kept as flags for convenience; they set ``workload_args`` exactly as
  ``-w corpus=...`` / ``-w packing=...`` would.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from bigbatch.cli._fields import Flag, build_command, config_option, flag_errors, flags_for, load_config
from bigbatch.train.config import TrainConfig

__all__ = ["register", "train_command", "train_flags", "make_train_command", "config_from_options", "WORKLOAD_SHORTCUTS"]

#: Flags spelled other than ``--field-name``.
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "workload_args": ("--workload-arg", "-w"),
    "fsdp": ("--fsdp/--ddp",),
}

#: Flags that are not TrainConfig fields but shortcuts for a bytelm ``workload_args`` key.
WORKLOAD_SHORTCUTS = ("corpus", "packing")


def _controller_keys() -> str:
    """``--adaptive-arg`` keys per controller, read from the controllers' signatures."""
    from bigbatch.adaptive import CONTROLLERS

    parts = []
    for name, cls in CONTROLLERS.items():
        keys = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            keys += [p.name for p in params if p.name not in ("self", "granularity") and p.name not in keys
                     and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        parts.append(f"{name}: {', '.join(keys)}")
    return "Keys: " + "; ".join(parts) + " (e.g. max_batch=4096)."


def train_flags(config_cls: type = TrainConfig) -> list[Flag]:
    """The flags of ``bigbatch train`` that set fields of ``config_cls``."""
    return flags_for(config_cls, decls=FLAG_NAMES, extra_help={"adaptive_args": _controller_keys()})


def config_from_options(config: Optional[Path], options: dict[str, Any], config_cls: type = TrainConfig) -> Any:
    """A TrainConfig from an optional TOML file overlaid with the given flags (None = not given)."""
    return load_config(config_cls, config, {k: v for k, v in options.items() if v is not None})


def _shortcut_args(corpus: Optional[list[Path]], packing: Optional[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if corpus:
        for p in corpus:
            if not p.exists():
                raise ValueError(f"--corpus path does not exist: {p}")
        out["corpus"] = [str(p) for p in corpus]
    if packing:
        out["packing"] = packing
    return out


def make_train_command(config_cls: type = TrainConfig, run: Callable[[Any], None] | None = None) -> Callable[..., None]:
    """The ``bigbatch train`` callback for ``config_cls`` (a TrainConfig or a subclass).

    ``run(cfg)`` does the work (default: launch or train, then print where the results are).
    """
    flags = train_flags(config_cls)
    run = run or _train_and_report

    def body(given: dict[str, Any], *, corpus: Optional[list[Path]], packing: Optional[str], config: Optional[Path]) -> None:
        cfg = load_config(config_cls, config, given)
        wargs = _shortcut_args(corpus, packing)
        if wargs:
            cfg = cfg.replace(workload_args={**cfg.workload_args, **wargs})
        with flag_errors(flags):
            run(cfg)

    extra = [
        inspect.Parameter("corpus", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[Path]], default=typer.Option(
            None, help="bytelm: text file or directory to train on (repeatable; default: the Python standard "
                       "library); the workload's corpus argument.")),
        inspect.Parameter("packing", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, help="bytelm: pack documents into rows (bfd or spfhp) without cross-document attention. "
                       "Same as -w packing=METHOD.")),
        config_option("TrainConfig"),
    ]
    return build_command(flags, body, extra=extra, doc=(
        "Train one workload at one batch size; writes metrics.jsonl, checkpoints and summary.json to --out."))


def _train_and_report(cfg: Any) -> None:
    from bigbatch.train import train

    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {cfg.nproc}")
    if cfg.max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {cfg.max_restarts}")
    check_nodes(cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint)
    if (cfg.nproc > 1 or cfg.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(_launch_torchrun(cfg.nproc, cfg.max_restarts, cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint))
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


train_command = make_train_command()


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


def check_nodes(nnodes: int, node_rank: int, rdzv_endpoint: str | None) -> None:
    """``ValueError`` naming the field unless the multi-node settings fit together."""
    if isinstance(nnodes, bool) or not isinstance(nnodes, int) or nnodes < 1:
        raise ValueError(f"nnodes must be an integer >= 1, got {nnodes!r}")
    if isinstance(node_rank, bool) or not isinstance(node_rank, int) or not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be an integer in [0, {nnodes - 1}] (nnodes is {nnodes}), got {node_rank!r}")
    if nnodes == 1:
        if rdzv_endpoint is not None:
            raise ValueError(f"rdzv_endpoint is for a run on several hosts; nnodes is 1, got rdzv_endpoint={rdzv_endpoint!r}")
        return
    if rdzv_endpoint is None:
        raise ValueError(f"rdzv_endpoint is required with nnodes={nnodes}: host:port on the first host (node_rank 0)")
    host, sep, port = rdzv_endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rdzv_endpoint must be host:port with a port in [1, 65535], got {rdzv_endpoint!r}")


def _launch_torchrun(nproc: int, max_restarts: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> int:
    """Re-run this very command under torchrun: ``--standalone`` on one host, else c10d rendezvous.

    On several hosts the node_rank 0 host hosts the rendezvous store (``is_host``) and the others
    connect to it, so which host serves it does not rest on torchrun matching the endpoint's
    name against its own. The ranks of the processes follow the order in which hosts join.
    """
    import subprocess
    import sys

    args = _strip_option(sys.argv[1:], ("--nproc", "--max-restarts", "--nnodes", "--node-rank", "--rdzv-endpoint"))
    if nnodes > 1:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 "--rdzv-id=bigbatch", f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}"]
    else:
        where = ["--standalone"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}", "-m", "bigbatch", *args,
    ]
    typer.echo("launching: " + " ".join(cmd[1:]), err=True)
    return subprocess.call(cmd)


def register(app: typer.Typer) -> None:
    """Add ``bigbatch train`` to ``app``."""
    app.command("train")(train_command)


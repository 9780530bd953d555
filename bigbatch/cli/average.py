"""``bigbatch average``: the uniform average of checkpoints (Popel & Bojar 2018), streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "average_command"]


def average_command(
    checkpoints: Optional[list[Path]] = typer.Argument(None, help="Checkpoint files, or with --last one directory."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write the averaged state_dict to (not a directory)."),
    last: Optional[int] = typer.Option(None, "--last", help="Average the last N readable checkpoints (by step) of the directory given; unreadable ones are skipped with a message."),
    key: Optional[str] = typer.Option(None, help="Key of the model weights inside each file (default: model, state_dict, ... or a plain state_dict)."),
    weights_only: bool = typer.Option(True, "--weights-only/--no-weights-only", help="Refuse pickled code in the files (turn off only for files you trust)."),
) -> None:
    """Average model weights: `bigbatch average a.pt b.pt -o avg.pt` or `bigbatch average --last 5 RUN_DIR -o avg.pt`.

    Floating-point tensors are averaged, integer buffers come from the last file; the output is a plain state_dict (`model.load_state_dict(torch.load("avg.pt"))`). A file named explicitly that cannot be read is an error; with --last, a checkpoint cut short by a crash is skipped and the next older one is used.
    """
    from bigbatch.averaging import average_checkpoints, check_output_file, last_loadable_checkpoints, save_atomic

    # Checked before any checkpoint is read: a bad --out must not cost the whole averaging.
    check_output_file(out, "--out")
    paths = list(checkpoints or [])
    if last is not None:
        if len(paths) != 1:
            raise ValueError(f"--last N takes exactly one directory, got {len(paths)} path(s)")
        paths, skipped = last_loadable_checkpoints(paths[0], last, key=key, weights_only=weights_only)
        for e in skipped:
            typer.echo(f"skipped {e.path}: {e.reason}", err=True)
    elif not paths:
        raise ValueError("give checkpoint files to average, or --last N DIR")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    if out.resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--out {out} is one of the inputs; choose another file")
    avg = average_checkpoints(paths, key=key, weights_only=weights_only)
    save_atomic(avg, out, name="--out")
    n_float = sum(1 for v in avg.values() if hasattr(v, "is_floating_point") and v.is_floating_point())
    n_params = sum(v.numel() for v in avg.values() if hasattr(v, "is_floating_point") and v.is_floating_point())
    typer.echo(f"averaged {len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name}): {n_float} tensors, {n_params:,} values")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("average")(average_command)

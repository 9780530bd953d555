"""The ``bigbatch`` command-line tool.

Each subcommand lives in its own module under ``bigbatch.cli`` and exposes
``register(app)``; this module only assembles them and turns library errors into one
line on stderr with exit code 2 (no traceback), as STYLE.md asks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from bigbatch import __version__

__all__ = ["app", "main", "UsageError"]

#: Subcommands in the order `bigbatch --help` lists them, with the line it shows there (the
#: first line of the command's docstring; a test keeps the two equal). A command's module is
#: imported when the command runs: building `train`'s and `scale`'s flags imports torch, which
#: `bigbatch --help` and the other commands need not wait for. Every name must have a module
#: (a missing one is an ImportError, never a silently absent command).
_SUBCOMMANDS: dict[str, str] = {
    "study": "Measure the critical batch size: steps/samples to a target vs batch size, fit, plots, report.html.",
    "train": "Train one workload at one batch size; writes metrics.jsonl, checkpoints and summary.json to --out.",
    "scale": "Rescale a recipe to another batch size: LR, warmup, betas/eps, EMA, with the reason for each.",
    "noise": "Plot and summarise the gradient noise scale B_simple logged by a training run.",
    "plan": "Plan a run from a study: batch size, GPUs, steps, samples, wall time, GPU-hours, schedule.",
    "average": "Average model weights: `bigbatch average a.pt b.pt -o avg.pt` or `bigbatch average --last 5 RUN_DIR -o avg.pt`.",
}


class _Commands(TyperGroup):
    """The ``bigbatch`` group: lists ``_SUBCOMMANDS`` and builds each one when it is used."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(_SUBCOMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in _SUBCOMMANDS and cmd_name not in self.commands:
            self.commands[cmd_name] = _build(cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(_SUBCOMMANDS.items()))


app = typer.Typer(
    cls=_Commands,
    name="bigbatch",
    help="Large-batch training for PyTorch: optimizers, scaling rules, noise scale, studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's option table truncates long flag names at 80 columns
    # (`--eval-every-samp…`); click's layout puts a long name on its own line and wraps the help.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


class UsageError(ValueError):
    """A bad command-line value; printed as one line, exit code 2."""


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"bigbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """bigbatch: take a recipe tuned at one batch size to a much larger one, and measure how far to go."""


def _build(name: str) -> Any:
    """The click command of subcommand ``name``, from ``bigbatch.cli.<name>.register``."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    importlib.import_module(f"bigbatch.cli.{name}").register(sub)
    return typer.main.get_command(sub)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bigbatch`` console script.

    Usage errors are handled by click (exit 2); library ``ValueError``s and file errors
    become one line on stderr with exit code 2, without a traceback.
    """
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="bigbatch", standalone_mode=True)
    except SystemExit as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A torchrun worker whose work is done (process group destroyed, files written) leaves
            # without the interpreter's teardown: gloo's background threads can otherwise abort it
            # there ("terminate called without an active exception") and fail the whole launch.
            sys.stdout.flush()
            sys.stderr.flush()
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            os._exit(code)
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)

"""The ``bigbatch`` command-line tool.

Each subcommand lives in its own module under ``bigbatch.cli`` and exposes
``register(app)``; this module only assembles them and turns library errors into one
line on stderr with exit code 2 (no traceback), as STYLE.md asks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer

from bigbatch import __version__

__all__ = ["app", "main", "UsageError"]

app = typer.Typer(
    name="bigbatch",
    help="Large-batch training for PyTorch: optimizers, scaling rules, noise scale, studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


# Subcommand modules, in the order `bigbatch --help` lists them.
_SUBCOMMANDS = ("study", "train", "scale", "noise", "average", "bench")

for _name in _SUBCOMMANDS:
    _spec = importlib.util.find_spec(f"bigbatch.cli.{_name}")
    if _spec is not None:
        importlib.import_module(f"bigbatch.cli.{_name}").register(app)


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

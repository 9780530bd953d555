"""The ``bigbatch`` command-line tool.

Each subcommand lives in its own module under ``bigbatch.cli`` and exposes
``register(app)``; this module only assembles them and turns library errors into one
line on stderr with exit code 2 (no traceback). An error raised in the user's own code (a
workload module, a model) keeps its traceback; ``--debug`` (or ``BIGBATCH_DEBUG=1``) shows
the traceback of any error.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import TracebackType
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
    debug: bool = typer.Option(
        False, "--debug", envvar="BIGBATCH_DEBUG", help="Show the Python traceback of any error (env BIGBATCH_DEBUG=1)."
    ),
) -> None:
    """bigbatch: take a recipe tuned at one batch size to a much larger one, and measure how far to go."""
    global _debug
    _debug = debug


def _build(name: str) -> Any:
    """The click command of subcommand ``name``, from ``bigbatch.cli.<name>.register``."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    importlib.import_module(f"bigbatch.cli.{name}").register(sub)
    return typer.main.get_command(sub)


#: Set by ``--debug`` (the root callback runs before any subcommand).
_debug = False
#: Errors that are the user's input, not a bug: one line, exit 2.
_ONE_LINE = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)
_PACKAGE = Path(__file__).resolve().parent.parent


def _library_dirs() -> list[Path]:
    """Where the standard library and installed packages live: code there is not the user's."""
    paths = sysconfig.get_paths()
    found = {Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    # Other installs on the path: a user site, Debian's dist-packages.
    found |= {Path(p).resolve() for p in sys.path if Path(p).name in ("site-packages", "dist-packages")}
    return [_PACKAGE, *found]


def _user_frame(tb: TracebackType | None) -> str | None:
    """``file:line`` of the innermost frame of ``tb`` in the user's own code, or None.

    User code is any Python file outside bigbatch, the standard library and installed
    packages — a ``--workload mymod:factory`` module, a model, a script. An error that passed
    through such a frame came from (or through) code the user wrote, and its traceback is the
    only way to find where; bigbatch's own ``ValueError``s stay one line.
    """
    libs = _library_dirs()
    found = None
    for frame, line in traceback.walk_tb(tb):
        name = frame.f_code.co_filename
        if name.startswith("<"):  # <frozen importlib._bootstrap>, <string>: not a user's file
            continue
        path = Path(name).resolve()
        if not any(path.is_relative_to(d) for d in libs):
            found = f"{name}:{line}"
    return found


def _debugging() -> bool:
    return _debug or os.environ.get("BIGBATCH_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bigbatch`` console script.

    Usage errors are handled by click (exit 2); library ``ValueError``s and file errors
    become one line on stderr with exit code 2, without a traceback. An error that passed
    through the user's own code (see ``_user_frame``) is shown with its traceback and exits
    with 1, as Python would; ``--debug`` shows every traceback.
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
    except _ONE_LINE as e:
        where = _user_frame(e.__traceback__)
        if where is not None or _debugging():
            traceback.print_exc()
            if where is not None:
                typer.echo(f"error in your code ({where}): {type(e).__name__}: {e}", err=True)
                sys.exit(1)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)

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
    debug: bool = typer.Option(
        False, "--debug", envvar="BIGBATCH_DEBUG", help="Show the Python traceback of any error (env BIGBATCH_DEBUG=1)."
    ),
) -> None:
    """bigbatch: take a recipe tuned at one batch size to a much larger one, and measure how far to go."""
    global _debug
    _debug = debug


# Subcommand modules, in the order `bigbatch --help` lists them.
_SUBCOMMANDS = ("study", "train", "scale", "noise", "average", "bench")

for _name in _SUBCOMMANDS:
    _spec = importlib.util.find_spec(f"bigbatch.cli.{_name}")
    if _spec is not None:
        importlib.import_module(f"bigbatch.cli.{_name}").register(app)


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

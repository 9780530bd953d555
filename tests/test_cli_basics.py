import subprocess
import sys

import bigbatch
from bigbatch import _checks

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bigbatch", *args], capture_output=True, text=True)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"bigbatch {bigbatch.__version__}"


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "Usage" in r.stdout


def test_unknown_command_exit_2():
    r = run_cli("no-such-command")
    assert r.returncode == 2


@pytest.mark.parametrize("bad", [-0.1, 0, float("nan"), float("inf"), "x"])
def test_check_positive_rejects(bad):
    with pytest.raises(ValueError, match="lr must be"):
        _checks.check_positive("lr", bad)


def test_check_choice_suggests():
    with pytest.raises(ValueError, match="did you mean lamb"):
        _checks.check_choice("optimizer", "lamm", ["sgd", "lamb", "lars"])


def test_core_imports_no_cli_libraries():
    code = (
        "import sys, bigbatch, bigbatch._checks\n"
        "import importlib, pkgutil\n"
        "core = ['optim', 'schedules', 'scaling', 'noise', 'adaptive', 'averaging', 'data']\n"
        "for m in core:\n"
        "    try: importlib.import_module('bigbatch.' + m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != 'bigbatch.' + m: raise\n"
        "bad = [m for m in ('typer', 'rich', 'matplotlib', 'scipy', 'click') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"core modules imported {r.stdout.strip()}"

"""The integration examples run (in-process, shortened) and print the b_simple they logged."""

from __future__ import annotations

import math
import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(capsys, monkeypatch, name: str, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.slow
def test_hf_trainer_example(capsys, monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    out = _run(capsys, monkeypatch, "hf_trainer.py", "--steps", "6", "--output-dir", str(tmp_path))
    m = re.search(r"b_simple \(logged at step (\d+)\): ([-\d.eE+]+)", out)
    assert m and int(m.group(1)) == 5, out  # logging_steps=5
    assert math.isfinite(float(m.group(2)))


@pytest.mark.slow
def test_lightning_example_with_ramp(capsys, monkeypatch):
    pytest.importorskip("lightning")
    out = _run(capsys, monkeypatch, "lightning_module.py", "--steps", "12", "--ramp")
    assert "batch changes" in out
    assert math.isfinite(float(re.search(r"b_simple \(logged\): ([-\d.eE+]+)", out).group(1)))


@pytest.mark.slow
def test_accelerate_example(capsys, monkeypatch):
    pytest.importorskip("accelerate")
    out = _run(capsys, monkeypatch, "accelerate_loop.py", "--epochs", "0.25")
    assert "mode accumulation" in out
    assert math.isfinite(float(re.search(r"b_simple ([-\d.eE+]+)", out).group(1)))


@pytest.mark.slow
def test_accelerate_example_two_processes(tmp_path):
    """DDP mode on two CPU processes: the global batch counts both, the readings are all-reduced."""
    pytest.importorskip("accelerate")
    import os
    import subprocess

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        str(EXAMPLES / "accelerate_loop.py"), "--epochs", "0.25"],
                       capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("global batch 256 on 2 process(es)") == 1  # printed by the main process only
    assert "mode ddp" in r.stdout
    assert math.isfinite(float(re.search(r"b_simple ([-\d.eE+]+)", r.stdout).group(1)))

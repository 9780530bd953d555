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

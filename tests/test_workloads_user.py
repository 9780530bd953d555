"""A user's own workload: finding the module, its arguments, the contract, and errors in user code."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.workloads import CheckedWorkload, WorkloadContractError, check_loss_output, load_workload

ROOT = Path(__file__).resolve().parent.parent
_ids = itertools.count()

# A small regression workload; LOSS is the body of loss(), so each test can break it its own way.
_SOURCE = '''
import torch
from torch import nn
from bigbatch.workloads import EpochSampler, WorkloadDefaults


class Toy:
    name = "toy"
    metric_name = "mse"
    higher_is_better = False
    count_unit = "examples"

    def __init__(self, n=64, dim=3):
        self.n, self.dim = n, dim
        self.dataset_size = n
        self.defaults = WorkloadDefaults(batch_size=8, lr=0.05, budget_samples=32)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1)

    def build_model(self):
        return nn.Linear(self.dim, 1)

    def sampler(self, seed):
        return EpochSampler(self.n, seed)

    def fetch(self, indices):
        return {"x": self.x[indices], "y": self.y[indices]}

    def count(self, batch):
        return int(batch["y"].shape[0])

    def loss(self, model, batch):
        err = (model(batch["x"])[:, 0] - batch["y"]) ** 2
LOSS

    @torch.no_grad()
    def evaluate(self, model, device):
        return float(((model(self.x)[:, 0] - self.y) ** 2).mean())


def make(**kwargs):
    return Toy(**kwargs)
'''
_GOOD = "        return err.sum(), err.shape[0]"


def _module(tmp_path, loss=_GOOD, extra=""):
    """Write a workload module into tmp_path; returns its (unique) module name."""
    name = f"user_wl_{os.getpid()}_{next(_ids)}"
    (tmp_path / f"{name}.py").write_text(extra + _SOURCE.replace("LOSS", loss))
    return name


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    """Run in tmp_path with neither it nor '' on sys.path, as the `bigbatch` console script does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != str(tmp_path)])
    before = set(sys.modules)
    yield tmp_path
    for m in set(sys.modules) - before:
        if m.startswith("user_wl_"):
            del sys.modules[m]


def _main(*args):
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def _train(module, tmp_path, *extra):
    return _main("train", "--workload", f"{module}:make", "--out", tmp_path / "run", "--progress", "none", "--device", "cpu", *extra)


def test_module_in_current_directory_is_found(in_dir):
    name = _module(in_dir)
    wl = load_workload(f"{name}:make", n=32)
    assert wl.dataset_size == 32 and isinstance(wl, CheckedWorkload) and wl.wrapped.name == "toy"
    assert os.path.abspath(sys.path[0]) == str(in_dir)


def test_missing_module_is_one_line_but_a_failing_import_inside_it_is_not(in_dir):
    with pytest.raises(ValueError, match="workload module 'no_such_mod_xyz' cannot be imported"):
        load_workload("no_such_mod_xyz:make")
    name = _module(in_dir, extra="import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):  # the user's own import: traceback kept
        load_workload(f"{name}:make")


def test_unknown_key_through_a_kwargs_factory_names_key_and_parameters(in_dir, capsys):
    name = _module(in_dir)
    with pytest.raises(ValueError) as e:
        load_workload(f"{name}:make", colour="red")
    assert str(e.value) == f"--workload-arg 'colour' is not an argument of workload '{name}:make' (Toy.__init__() takes: n, dim)"
    assert _train(name, in_dir, "-w", "colour=red") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workload-arg 'colour'") and "n, dim" in err and "Traceback" not in err


def test_bare_tensor_loss_says_which_contract_was_broken(in_dir, capsys):
    name = _module(in_dir, loss="        return err.mean()")
    assert _train(name, in_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"'{name}:make': loss(model, batch) must return (sum of per-unit losses, count)" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_error_in_user_code_keeps_its_traceback(in_dir, capsys):
    name = _module(in_dir, loss="        raise ValueError('bad shapes in my model')")
    assert _train(name, in_dir) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{name}.py" in err
    assert f"error in your code ({in_dir / name}.py:" in err and "ValueError: bad shapes in my model" in err


def test_debug_shows_the_traceback_of_a_library_error(tmp_path, capsys, monkeypatch):
    assert _main("average", tmp_path / "none.pt", "-o", tmp_path / "avg.pt") == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'none.pt'}\n"
    assert _main("--debug", "average", tmp_path / "none.pt", "-o", tmp_path / "avg.pt") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(f"error: checkpoint not found: {tmp_path / 'none.pt'}\n")
    monkeypatch.setenv("BIGBATCH_DEBUG", "1")
    assert _main("average", tmp_path / "none.pt", "-o", tmp_path / "avg.pt") == 2
    assert "Traceback" in capsys.readouterr().err


def test_checks_run_once_then_the_workload_s_own_methods(in_dir):
    name = _module(in_dir)
    wl = load_workload(f"{name}:make")
    model = wl.build_model()
    batch = wl.fetch(torch.arange(4))
    assert wl.count(batch) == 4
    assert wl.loss(model, batch)[1] == 4
    for m in ("build_model", "fetch", "count", "loss"):  # replaced by the bound methods: no cost per step
        assert getattr(wl, m) == getattr(wl.wrapped, m)
    assert wl.evaluate.__name__ == "first"  # not called yet
    wl.evaluate(model, torch.device("cpu"))
    assert wl.evaluate == wl.wrapped.evaluate


@pytest.mark.parametrize(
    "out, match",
    [
        (torch.ones(2, requires_grad=True) * 1.0, "got a torch.float32 tensor of shape \\(2,\\)"),  # unpacked silently before
        ((torch.ones((), requires_grad=True) * 1.0, 3, 4), "got a tuple of 3 items"),
        ((torch.ones(3, requires_grad=True) * 1.0, 3), "one-element floating-point tensor"),
        ((torch.tensor(1.0), 3), "does not require grad"),
        ((torch.ones((), requires_grad=True) * 1.0, 2.5), "count must be an int"),
        ((torch.ones((), requires_grad=True) * 1.0, torch.tensor(5)), "counted 5 units but count\\(batch\\) says 3"),
    ],
)
def test_check_loss_output_refuses(out, match):
    with pytest.raises(WorkloadContractError, match=match):
        check_loss_output(out, "m:f", expected_count=3)


def test_check_loss_output_accepts():
    s = torch.ones((), requires_grad=True) * 2.0
    check_loss_output((s, 3), "m:f", expected_count=3)
    check_loss_output((s.reshape(1), torch.tensor(3)), "m:f", expected_count=3)
    with torch.no_grad():
        check_loss_output((torch.tensor(1.0), 3), "m:f")  # evaluation without grad is fine


def test_attribute_contract_checked_at_load(in_dir):
    name = _module(in_dir)
    (in_dir / f"{name}_bad.py").write_text(
        f"from {name} import Toy\nclass Bad(Toy):\n    count_unit = 'bytes'\ndef make(**kw):\n    return Bad(**kw)\n"
    )
    with pytest.raises(WorkloadContractError, match="count_unit must be one of examples, tokens, got 'bytes'"):
        load_workload(f"{name}_bad:make")


def test_example_workload_trains_from_its_folder(tmp_path):
    """docs/workloads.md's example, as a user runs it: the console script (no cwd on sys.path), from its folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-P", "-m", "bigbatch", "train", "--workload", "my_workload:make", "-w", "num_examples=256",
           "--budget-samples", "128", "--batch-size", "32", "--eval-every-samples", "64", "--seed", "1",
           "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=ROOT / "examples", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == 128 and 0.0 <= summary["final_metric"] <= 1.0

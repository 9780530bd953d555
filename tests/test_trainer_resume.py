"""Nothing lost, nothing silent: --out holding a run, resume rules, damaged checkpoints, the
checkpoint format version, and RNG seeding/restoring for workloads that draw from numpy/random."""

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigbatch.train import TrainConfig, train
from bigbatch.train.metrics import read_metrics
from bigbatch.workloads import load_workload

LIN = dict(workload="linreg", workload_args={"dim": 8}, batch_size=16, lr=0.05, budget_samples=16 * 12,
           eval_every_samples=16 * 4, checkpoint_every_samples=16 * 4, log_every_steps=2, progress="none")


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_s", "tokens_per_s")} for r in records]


# ---- --out holding a run ---------------------------------------------------------------------------

def test_out_with_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    train(TrainConfig(**LIN, out=str(tmp_path)))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="--resume.*--overwrite") as e:
        train(TrainConfig(**{**LIN, "lr": 0.01}, out=str(tmp_path)))
    assert len(str(e.value).splitlines()) == 1
    # nothing was touched
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_overwrite_replaces_the_old_run(tmp_path):
    train(TrainConfig(**{**LIN, "budget_samples": 16 * 16}, out=str(tmp_path)))
    assert (tmp_path / "checkpoints" / "ckpt_00000016.pt").exists()
    res = train(TrainConfig(**LIN, overwrite=True, out=str(tmp_path)))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt_00000008.pt", "ckpt_00000012.pt"]  # the old run's step 16 is gone
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 12
    assert res.summary["steps"] == 12
    with pytest.raises(ValueError, match="contradict"):
        train(TrainConfig(**LIN, overwrite=True, resume=True, out=str(tmp_path)))


def test_cli_refuses_out_with_a_run(tmp_path):
    args = [sys.executable, "-m", "bigbatch", "train", "--workload", "linreg", "-w", "dim=4", "--budget-samples", "128",
            "--progress", "none", "--out", str(tmp_path)]
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "--resume" in r.stderr and "--overwrite" in r.stderr


# ---- resume: settings, nothing to resume, damaged checkpoints, format version -----------------------

def test_resume_refuses_a_changed_setting_and_accepts_listed_ones(tmp_path):
    train(TrainConfig(**LIN, out=str(tmp_path), max_steps=6))
    with pytest.raises(ValueError, match=r"batch_size was 16 in the checkpoint, now 32") as e:
        train(TrainConfig(**{**LIN, "batch_size": 32}, resume=True, out=str(tmp_path)))
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"lr was 0.05 in the checkpoint, now 0.1"):
        train(TrainConfig(**{**LIN, "lr": 0.1}, resume=True, out=str(tmp_path)))
    res = train(TrainConfig(**{**LIN, "budget_samples": 16 * 14, "log_every_steps": 1}, resume=True, out=str(tmp_path)))
    assert res.summary["resumed_from"].endswith("ckpt_00000006.pt") and res.summary["steps"] == 14
    assert res.summary["batch_size"] == 16 and res.summary["config"]["batch_size"] == 16


def test_resume_with_nothing_to_resume_says_so_and_starts_fresh(tmp_path, capsys):
    res = train(TrainConfig(**LIN, resume=True, out=str(tmp_path)))
    out = capsys.readouterr().out
    assert "no checkpoint" in out and "starting a fresh run" in out
    assert res.summary["resumed_from"] is None and res.summary["steps"] == 12


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path, capsys):
    full = train(TrainConfig(**LIN, out=str(tmp_path / "full")))
    part = tmp_path / "part"
    train(TrainConfig(**LIN, out=str(part), max_steps=10))
    newest = part / "checkpoints" / "ckpt_00000010.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (a full disk, a copy cut short)
    capsys.readouterr()
    resumed = train(TrainConfig(**LIN, resume=True, out=str(part)))
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "ckpt_00000010.pt" in out
    assert resumed.summary["resumed_from"].endswith("ckpt_00000008.pt")
    assert torch.equal(_params(full.model), _params(resumed.model))
    assert _strip(read_metrics(tmp_path / "full" / "metrics.jsonl")) == _strip(read_metrics(part / "metrics.jsonl"))


def test_no_loadable_checkpoint_is_one_line_error(tmp_path):
    train(TrainConfig(**LIN, out=str(tmp_path), max_steps=10))
    for p in (tmp_path / "checkpoints").glob("ckpt_*.pt"):
        p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="no checkpoint in .* loads") as e:
        train(TrainConfig(**LIN, resume=True, out=str(tmp_path)))
    assert len(str(e.value).splitlines()) == 1


def _rewrite_newest(outdir, change):
    path = sorted((outdir / "checkpoints").glob("ckpt_*.pt"))[-1]
    blob = torch.load(path, weights_only=False)
    change(blob)
    torch.save(blob, path)
    return path


def test_checkpoint_format_version(tmp_path):
    from bigbatch.train.state import FORMAT_VERSION

    train(TrainConfig(**LIN, out=str(tmp_path / "a"), max_steps=6))
    blob = torch.load(tmp_path / "a" / "checkpoints" / "ckpt_00000006.pt", weights_only=False)
    assert blob["format_version"] == FORMAT_VERSION and blob["state"]["step"] == blob["step"] == 6
    _rewrite_newest(tmp_path / "a", lambda b: b.update(format_version=99))
    with pytest.raises(ValueError, match="format version 99"):
        train(TrainConfig(**LIN, resume=True, out=str(tmp_path / "a")))
    _rewrite_newest(tmp_path / "a", lambda b: (b.update(format_version=FORMAT_VERSION), b.pop("state")))
    with pytest.raises(ValueError, match="missing state"):
        train(TrainConfig(**LIN, resume=True, out=str(tmp_path / "a")))


def test_versionless_checkpoint_is_read_as_version_0(tmp_path):
    """Checkpoints written before the version existed: no key, a state dict without the optional fields."""
    full = train(TrainConfig(**LIN, out=str(tmp_path / "full")))
    train(TrainConfig(**LIN, out=str(tmp_path / "part"), max_steps=6))

    def legacy(b):
        b.pop("format_version")
        for k in ("ema_metric", "b_simple_at_target"):
            b["state"].pop(k)
        b["config"].pop("overwrite")

    _rewrite_newest(tmp_path / "part", legacy)
    resumed = train(TrainConfig(**LIN, resume=True, out=str(tmp_path / "part")))
    assert torch.equal(_params(full.model), _params(resumed.model))


# ---- seeding: numpy.random and random, saved and restored -----------------------------------------

class _GlobalRNGSampler:
    """Draws indices from numpy's global generator and ``random``: a user's sampler that keeps no state."""

    def next(self, n):
        base = np.random.randint(0, 1 << 30, size=n)
        return torch.as_tensor(base + random.randrange(1000), dtype=torch.int64)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _rng_workload():
    wl = load_workload("linreg", dim=8)
    wl.sampler = lambda seed: _GlobalRNGSampler()
    return wl


def test_numpy_and_random_are_seeded_and_restored(tmp_path):
    np.random.seed(123)  # whatever the process did before must not matter
    a = train(TrainConfig(**LIN, out=str(tmp_path / "a")), workload=_rng_workload())
    random.random()
    b = train(TrainConfig(**LIN, out=str(tmp_path / "b")), workload=_rng_workload())
    assert torch.equal(_params(a.model), _params(b.model))
    train(TrainConfig(**LIN, out=str(tmp_path / "c"), max_steps=6), workload=_rng_workload())
    np.random.seed(7)
    random.seed(7)
    c = train(TrainConfig(**LIN, resume=True, out=str(tmp_path / "c")), workload=_rng_workload())
    assert c.summary["resumed_from"].endswith("ckpt_00000006.pt")
    assert torch.equal(_params(a.model), _params(c.model))

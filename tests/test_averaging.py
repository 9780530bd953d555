"""Checkpoint averaging: exactness, layouts, streaming, errors, the CLI."""

import os
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bigbatch.averaging import average_checkpoints, extract_state_dict, last_checkpoints, load_model_state


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _trainer_blob(model, step):
    """The layout bigbatch.train.loop.checkpoint() writes."""
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "sampler": {"seed": 0, "epoch": 0, "pos": step},
        "state": {"step": step, "samples": step * 4, "best_metric": None},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "step": step,
        "samples": step * 4,
        "config": {"workload": "x", "optimizer_args": {"betas": (0.9, 0.95)}},
    }


def test_n_copies_average_to_themselves_exactly():
    sd = _net(0).state_dict()
    avg = average_checkpoints([sd] * 7)
    assert list(avg) == list(sd)
    for k in sd:
        assert avg[k].dtype == sd[k].dtype
        assert torch.equal(avg[k], sd[k]), k


def test_equals_direct_mean_in_float64():
    sds = [_net(s).state_dict() for s in range(5)]
    for i, sd in enumerate(sds):
        sd["1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
    avg = average_checkpoints(sds)
    for k, v in avg.items():
        if v.is_floating_point():
            ref = torch.stack([sd[k].double() for sd in sds]).mean(0)
            torch.testing.assert_close(v.double(), ref, rtol=0, atol=2e-7)
    assert int(avg["1.num_batches_tracked"]) == 50  # integer buffer: the last one
    assert avg["1.num_batches_tracked"].dtype == torch.int64


def test_bf16_accumulates_in_fp32():
    sds = [OrderedDict(w=torch.full((3,), 1.0 + i * 2**-7).to(torch.bfloat16)) for i in range(3)]
    avg = average_checkpoints(sds)
    assert avg["w"].dtype == torch.bfloat16
    assert torch.equal(avg["w"], torch.full((3,), 1.0 + 2**-7, dtype=torch.bfloat16))


def test_trainer_checkpoint_files_and_streaming(tmp_path, monkeypatch):
    paths = []
    for step in (10, 20, 30):
        net = _net(step)
        blob = _trainer_blob(net, step)
        p = tmp_path / f"ckpt_{step:08d}.pt"
        torch.save(blob, p)
        paths.append(p)
    direct = average_checkpoints([torch.load(p, weights_only=False)["model"] for p in paths])

    import bigbatch.averaging.checkpoints as averaging

    live, peak = [0], [0]
    real = averaging.load_model_state

    class Tracked(OrderedDict):
        def __del__(self):
            live[0] -= 1

    def counting(path, **kw):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return Tracked(real(path, **kw))

    monkeypatch.setattr(averaging, "load_model_state", counting)
    avg = averaging.average_checkpoints(paths)
    assert peak[0] == 1  # one loaded checkpoint at a time, next to the running average
    for k in direct:
        assert torch.equal(avg[k], direct[k])
    net = _net(0)
    net.load_state_dict(avg)  # a plain state_dict


def test_layouts_and_key():
    sd = _net(0).state_dict()
    for layout in ({"model": sd, "step": 3}, {"state_dict": sd, "epoch": 1}, sd):
        out = extract_state_dict(layout)
        assert list(out) == list(sd)
    assert list(extract_state_dict({"ema": sd, "model": {}}, key="ema")) == list(sd)
    with pytest.raises(ValueError, match="key 'nope' not found"):
        extract_state_dict({"model": sd}, key="nope")
    with pytest.raises(ValueError, match="no model weights found"):
        extract_state_dict({"step": 3, "config": {"a": 1}})


def test_mismatched_keys_and_shapes_name_the_first_mismatch():
    a = _net(0).state_dict()
    b = OrderedDict(a)
    del b["3.bias"]
    with pytest.raises(ValueError, match=r"key '3.bias' .* is missing"):
        average_checkpoints([a, b])
    c = OrderedDict(a, extra=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        average_checkpoints([a, c])
    d = OrderedDict(a)
    d["0.weight"] = torch.zeros(8, 5)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(8, 5\) but \(8, 4\)"):
        average_checkpoints([a, d])
    e = OrderedDict(a)
    e["0.weight"] = a["0.weight"].double()
    with pytest.raises(ValueError, match="dtype"):
        average_checkpoints([a, e])


def test_nonfinite_and_empty_refused():
    a = _net(0).state_dict()
    b = OrderedDict(a)
    b["0.bias"] = torch.full_like(a["0.bias"], float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        average_checkpoints([a, b])
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])


def test_unsafe_pickles_refused_by_default(tmp_path):
    p = tmp_path / "ckpt_1.pt"
    torch.save({"model": _net(0).state_dict(), "obj": _Custom()}, p)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_model_state(p)
    assert "0.weight" in load_model_state(p, weights_only=False)
    with pytest.raises(FileNotFoundError):
        load_model_state(tmp_path / "missing.pt")


class _Custom:
    pass


def test_last_checkpoints_orders_by_step(tmp_path):
    for step in (5, 100, 20, 3):
        torch.save({"w": torch.zeros(1)}, tmp_path / f"ckpt_{step:d}.pt")
    (tmp_path / "notes.txt").write_text("x")
    torch.save({"w": torch.zeros(1)}, tmp_path / "avg2.pt")  # no step in the name: ignored
    assert [p.name for p in last_checkpoints(tmp_path, 2)] == ["ckpt_20.pt", "ckpt_100.pt"]
    assert len(last_checkpoints(tmp_path, 9, allow_fewer=True)) == 4
    with pytest.raises(ValueError, match="n must be <= the 4"):
        last_checkpoints(tmp_path, 9)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        last_checkpoints(tmp_path, 0)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, run / "avg_5.pt")  # an output next to checkpoints/ does not count
    torch.save({"w": torch.zeros(1)}, run / "checkpoints" / "ckpt_00000007.pt")
    assert last_checkpoints(run, 1)[0].name == "ckpt_00000007.pt"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bigbatch", "average", *args], capture_output=True, text=True)


def test_cli_average(tmp_path):
    sds = []
    for step in (1, 2, 3):
        net = _net(step)
        torch.save(_trainer_blob(net, step), tmp_path / f"ckpt_{step:08d}.pt")
        sds.append(net.state_dict())
    out = tmp_path / "avg.pt"
    r = _cli("--last", "2", str(tmp_path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 checkpoints" in r.stdout
    got = torch.load(out, weights_only=True)
    ref = average_checkpoints(sds[1:])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    r = _cli(str(tmp_path / "ckpt_00000001.pt"), str(tmp_path / "ckpt_00000003.pt"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = torch.load(out, weights_only=True)
    ref = average_checkpoints([sds[0], sds[2]])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    r = _cli("--last", "9", str(tmp_path), "-o", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error: n must be <= the 3") and "Traceback" not in r.stderr
    r = _cli(str(tmp_path / "nope.pt"), "-o", str(out))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


# ---- careful reading and writing (issue: crashes and leftovers in `bigbatch average`) ---------


def _main(*args):
    """`bigbatch average ARGS` in this process: (exit code, stdout, stderr) via capsys by the caller."""
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["average", *map(str, args)])
    return e.value.code


def _run_dir(tmp_path, steps=(1, 2, 3)):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    sds = {}
    for step in steps:
        net = _net(step)
        torch.save(_trainer_blob(net, step), run / "checkpoints" / f"ckpt_{step:08d}.pt")
        sds[step] = net.state_dict()
    return run, sds


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _leftovers(root):
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def test_cli_out_is_a_directory_or_under_a_file(tmp_path, capsys):
    run, _ = _run_dir(tmp_path)
    (tmp_path / "outdir").mkdir()
    assert _main("--last", 2, run, "-o", tmp_path / "outdir") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "is a directory" in err and err.count("\n") == 1
    assert _leftovers(tmp_path) == []  # the .outdir.tmpNNNN file used to stay behind
    (tmp_path / "afile").write_text("x")
    assert _main("--last", 2, run, "-o", tmp_path / "afile" / "avg.pt") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "is a file, not a directory" in err and err.count("\n") == 1
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_cli_out_in_read_only_directory(tmp_path, capsys):
    run, _ = _run_dir(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _main("--last", 2, run, "-o", ro / "avg.pt") == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "not writable" in err and err.count("\n") == 1


def test_cli_out_in_unwritable_directory_simulated(tmp_path, monkeypatch, capsys):
    """The same check where the tests run as root (which chmod does not stop): os.access says no."""
    from bigbatch import _files

    run, _ = _run_dir(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(_files.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    assert _main("--last", 2, run, "-o", ro / "avg.pt") == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {ro / 'avg.pt'}: the directory {ro} is not writable\n"
    assert list(ro.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """A write that fails half-way (disk full) removes its temporary file and says so on one line."""
    import errno

    from bigbatch.averaging import checkpoints

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    run, _ = _run_dir(tmp_path)
    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    assert _main("--last", 2, run, "-o", tmp_path / "avg.pt") == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path / 'avg.pt'} cannot be written: No space left on device\n"
    assert _leftovers(tmp_path) == [] and not (tmp_path / "avg.pt").exists()
    with pytest.raises(KeyboardInterrupt):  # an interrupt mid-write cleans up too
        monkeypatch.setattr(checkpoints.torch, "save", lambda obj, f: (Path(f).write_bytes(b"x"), (_ for _ in ()).throw(KeyboardInterrupt())))
        checkpoints.save_atomic({"w": torch.zeros(1)}, tmp_path / "b.pt")
    assert _leftovers(tmp_path) == []


def test_cli_truncated_file_named_explicitly_is_an_error(tmp_path, capsys):
    run, _ = _run_dir(tmp_path)
    bad = run / "checkpoints" / "ckpt_00000003.pt"
    _truncate(bad)
    assert _main(run / "checkpoints" / "ckpt_00000001.pt", bad, "-o", tmp_path / "avg.pt") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: truncated") and err.count("\n") == 1
    assert not (tmp_path / "avg.pt").exists()


def test_cli_last_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    run, sds = _run_dir(tmp_path, steps=(1, 2, 3, 4))
    _truncate(run / "checkpoints" / "ckpt_00000004.pt")
    out = tmp_path / "avg.pt"
    assert _main("--last", 2, run, "-o", out) == 0
    cap = capsys.readouterr()
    assert "skipped" in cap.err and "ckpt_00000004.pt" in cap.err and "truncated" in cap.err
    assert "ckpt_00000002.pt .. ckpt_00000003.pt" in cap.out
    got = torch.load(out, weights_only=True)
    ref = average_checkpoints([sds[2], sds[3]])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # Not enough readable ones: an error that says which were skipped.
    assert _main("--last", 4, run, "-o", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "only 3 of its 4 checkpoints can be read" in err and "ckpt_00000004.pt" in err


@pytest.mark.parametrize("weights_only", [True, False])
def test_random_bytes_named_and_not_blamed_on_weights_only(tmp_path, capsys, weights_only):
    run, _ = _run_dir(tmp_path)
    junk = tmp_path / "junk_9.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    flag = ["--weights-only"] if weights_only else ["--no-weights-only"]
    assert _main(*flag, run / "checkpoints" / "ckpt_00000001.pt", junk, "-o", tmp_path / "avg.pt") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {junk}: not a PyTorch checkpoint") and "weights-only" not in err and err.count("\n") == 1


def test_load_errors_say_what_is_wrong(tmp_path):
    from bigbatch.averaging import CheckpointError

    empty = tmp_path / "e_1.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model_state(empty)
    legacy = tmp_path / "l_1.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_model_state(legacy)["w"], torch.ones(2))  # the legacy format still loads
    cut = tmp_path / "c_1.pt"
    torch.save({"w": torch.ones(2)}, cut)
    _truncate(cut, keep=0.9)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model_state(cut)
    assert e.value.path == cut and "central directory" in e.value.reason

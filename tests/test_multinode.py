"""``bigbatch train`` across hosts: two "nodes" on one CPU host (c10d rendezvous on localhost, gloo)
train to the same parameters as ``--nproc 2`` on one node; bad multi-node flags are one-line errors."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bigbatch.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

COMMON = ["--workload", "linreg", "-w", "dim=16", "--batch-size", "32", "--lr", "0.05", "--optimizer", "sgd",
          "--momentum", "0.9", "--budget-samples", str(32 * 12), "--progress", "none", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bigbatch", "train", *COMMON, "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen) -> str:
    try:
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text[-3000:]
    return text


def _final_params(outdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(outdir / "checkpoints"), weights_only=False)["model"]


@pytest.mark.slow
def test_two_nodes_equal_two_processes_on_one_node(tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    # All three launches at once (most of their time is start-up and rendezvous); the joining
    # node first: it waits for node 0's rendezvous store.
    procs = [_train(tmp_path / "nodes", "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", endpoint)
             for r in (1, 0)] + [_train(tmp_path / "one", "--nproc", "2")]
    try:
        logs = [_finish(p) for p in procs]
    finally:  # one that failed leaves none of the others running
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "--rdzv-backend=c10d" in logs[0] and "is_host=false" in logs[0] and "is_host=true" in logs[1]
    assert "--standalone" in logs[2]
    a, b = _final_params(tmp_path / "nodes"), _final_params(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # Two processes really trained (one per node), and they stepped as one run of the global batch.
    import json

    s = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 12


def _cli(capsys, *args):
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", *COMMON, *args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29400"], "--node-rank must be an integer in [0, 1]"),
    (["--nnodes", "0"], "--nnodes must be an integer >= 1"),
    (["--nnodes", "2"], "--rdzv-endpoint is required with nnodes=2: host:port on the first host"),
    (["--nnodes", "2", "--rdzv-endpoint", "headnode"], "--rdzv-endpoint must be host:port"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:70000"], "--rdzv-endpoint must be host:port"),
    (["--rdzv-endpoint", "h:29400"], "--rdzv-endpoint is for a run on several hosts"),
])
def test_bad_multinode_flags_are_one_line_errors(tmp_path, capsys, args, match):
    code, err = _cli(capsys, "--out", str(tmp_path / "o"), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert not (tmp_path / "o").exists()

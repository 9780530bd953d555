"""Choosing where a study's cells run, without Ray installed: the settings are checked, the
Ray-only flags are refused without ``--executor ray``, a missing Ray says how to install it,
and the core never imports Ray."""

import socket
import subprocess
import sys

import pytest

from bigbatch.study import StudyConfig
from bigbatch.study.ray_executor import check_address, gpus_per_cell, import_ray


def _cli(capsys, *args):
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", *args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--ray-address", "head:6379"], "--ray-address applies to the Ray executor only; --executor must be ray"),
    (["--cell-retries", "5"], "--cell-retries applies to the Ray executor only"),
    (["--ray-cpus-per-cell", "2"], "--ray-cpus-per-cell applies to the Ray executor only"),
    (["--executor", "slurm"], "unknown executor 'slurm'"),
    (["--executor", "ray", "--cell-retries", "-1"], "--cell-retries must be an integer >= 0"),
    (["--executor", "ray", "--ray-cpus-per-cell", "-1"], "--ray-cpus-per-cell must be a number >= 0"),
    (["--executor", "ray", "--ray-address", "headnode"], "--ray-address must be host:port"),
])
def test_bad_executor_flags_are_one_line_errors(tmp_path, capsys, args, match):
    code, err = _cli(capsys, "--workload", "linreg", "--target", "0.1", "--out", str(tmp_path / "o"), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


def test_missing_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: ``import ray`` fails
    with pytest.raises(ValueError, match=r"pip install 'bigbatch\[ray\]'"):
        import_ray()
    code, err = _cli(capsys, "--workload", "linreg", "--target", "0.1", "--executor", "ray", "--out", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "pip install 'bigbatch[ray]'" in lines[0], err


def test_check_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="no Ray cluster answers there"):
        check_address(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="no Ray cluster answers there"):
        check_address(f"ray://127.0.0.1:{port}")
    for bad in ("127.0.0.1", "h:0", "h:99999", ":80"):
        with pytest.raises(ValueError, match="must be host:port"):
            check_address(bad)
    check_address("auto")  # left to Ray
    with socket.socket() as s:  # something listening: accepted
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_address(f"127.0.0.1:{s.getsockname()[1]}")


def test_gpu_share_per_cell():
    assert gpus_per_cell(StudyConfig()) == 1.0

    class Shared:
        cells_per_gpu = 4

    assert gpus_per_cell(Shared()) == 0.25


def test_local_study_and_core_never_import_ray():
    code = ("import sys, bigbatch, bigbatch.optim, bigbatch.noise, bigbatch.study, bigbatch.study.runner, "
            "bigbatch.study.ray_executor, bigbatch.cli\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)

"""A workload whose process dies once mid-cell, for the Ray executor's retry test.

``linreg_dies_once(marker=PATH, driver_pid=PID)`` is the linreg workload, except that the first
process other than the study driver to fetch its 5th batch creates ``marker`` (holding its pid)
and SIGKILLs itself, as a crashed or preempted Ray worker would; every later run sees the
marker and trains normally. ``linreg_leaks(mib=N)`` is linreg whose every build keeps N MiB of
tensors alive in this module for good, as a leaking library would, for the worker-reuse test.
Importable by the Ray workers through PYTHONPATH.
"""

from __future__ import annotations

import os
import signal

import torch

from bigbatch.workloads.linreg import LinReg


class _DiesOnce(LinReg):
    def __init__(self, marker: str, driver_pid: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._marker = marker
        self._driver = driver_pid
        self._fetched = 0

    def fetch(self, indices):
        self._fetched += 1
        if self._fetched == 5 and os.getpid() != self._driver:
            try:
                fd = os.open(self._marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().fetch(indices)


def linreg_dies_once(marker: str, driver_pid: int, dim: int = 4, noise_std: float = 0.5) -> LinReg:
    return _DiesOnce(marker, driver_pid, dim=dim, noise_std=noise_std)


_KEPT: list = []  # what linreg_leaks never frees, per process


class _Leaks(LinReg):
    def __init__(self, mib: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._mib = mib

    def build_model(self):
        _KEPT.append(torch.ones(self._mib * 2**18))  # float32: mib MiB
        return super().build_model()


def linreg_leaks(mib: int, dim: int = 4, noise_std: float = 0.5) -> LinReg:
    return _Leaks(mib, dim=dim, noise_std=noise_std)

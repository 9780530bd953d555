"""Where a study's cells run: one small interface, an executor per place.

The driver (runner.py) owns everything that makes a study a study — which cells to run,
skipping finished ones, the LR-grid extensions, ``result.json``, the progress display — and
asks an executor for two things only: *start this cell* (``submit``) and *give me the next
cell that finished, with its record* (``next_finished``). So the in-process runner, the local
worker processes and a Ray cluster (ray_executor.py) schedule cells by the same code, and a
study gives the same cells wherever it runs.

A record an executor returns is that of the job it was given (same cell directory, same
attempt token); the driver writes it with ``cells.write_result``, which refuses any other
attempt's record.

``make_executor`` picks the executor a study's config asks for. Imports point one way: the driver
imports this module, this module imports ``ray_executor`` (inside ``make_executor``, only for
``--executor ray``), and ``ray_executor`` imports neither.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Protocol

from bigbatch.study.cells import Cell, run_cell

__all__ = [
    "CellJob", "Executor", "InProcessExecutor", "WorkerPoolExecutor", "worker_env",
    "make_executor", "plan_workers", "resolve_device", "visible_gpus",
]


@dataclass(frozen=True, slots=True)
class CellJob:
    """One cell to run: its directory on the driver (holding ``cell.json``) and the attempt it runs under."""

    cell: Cell
    cell_dir: Path
    attempt: str


class Executor(Protocol):
    """Runs cells; the driver keeps at most ``capacity()`` of them submitted and unfinished."""

    on_note: Callable[[str], None] | None
    """Where the executor says what the driver should show (a retried cell); set by the driver."""

    def capacity(self) -> int:
        """How many cells it runs at once (read before each submission: a cluster may grow)."""
        ...

    def submit(self, job: CellJob) -> None:
        """Start ``job`` (or queue it to start when ``next_finished`` is called)."""
        ...

    def next_finished(self) -> tuple[CellJob, dict[str, Any]]:
        """Block until a submitted cell finishes; its job and record. A failed cell raises."""
        ...

    def close(self, *, clean: bool) -> None:
        """Release the workers; ``clean=False`` (interrupt, failure) stops running cells now."""
        ...


class InProcessExecutor:
    """One cell at a time in this process (``--jobs 1``); ``run_cell_fn`` replaces ``run_cell`` in tests."""

    def __init__(self, workload: Any, run_cell_fn: Callable[..., dict[str, Any]] | None = None) -> None:
        self._workload = workload
        self._run = run_cell_fn or run_cell
        self._todo: list[CellJob] = []
        self.on_note: Callable[[str], None] | None = None

    def capacity(self) -> int:
        return 1

    def submit(self, job: CellJob) -> None:
        self._todo.append(job)

    def next_finished(self) -> tuple[CellJob, dict[str, Any]]:
        job = self._todo.pop(0)
        return job, self._run(job.cell_dir, self._workload)

    def close(self, *, clean: bool) -> None:
        self._todo.clear()


def worker_env(slot: int, gpus: list[str], threads: int) -> dict[str, str]:
    """The environment of worker ``slot``: its GPU (slots take the GPUs in turn) and its CPU threads."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    env["OMP_NUM_THREADS"] = env["BIGBATCH_THREADS"] = str(threads)
    return env


class WorkerPoolExecutor:
    """Up to ``jobs`` worker processes on this host (worker.py), each fed one cell at a time.

    On GPUs each worker sees one device through ``CUDA_VISIBLE_DEVICES`` (with ``--cells-per-gpu``
    N, N workers share each); the CPU cores are shared out among the workers (small models run best on one thread each, several cells side by side).
    Workers start when there is a cell for them. They die with this process, however it ends
    (worker.py: a parent-death signal on Linux, and everywhere a pipe whose write end only this
    process holds: its end of file, when this process is gone, stops the worker).
    """

    def __init__(self, jobs: int, gpus: list[str], out: Path) -> None:
        self._jobs = jobs
        self._gpus = gpus
        self._out = out
        self._threads = max(1, (os.cpu_count() or 1) // jobs)
        self._answers: queue_mod.Queue = queue_mod.Queue()
        self._workers: list[tuple[subprocess.Popen, IO[str]]] = []
        self._busy: dict[int, CellJob] = {}
        self._lifelines: list[int] = []  # write ends of the pipes the workers watch; closed once they have exited
        self.on_note: Callable[[str], None] | None = None

    def capacity(self) -> int:
        return self._jobs

    def _start_worker(self) -> int:
        slot = len(self._workers)
        env = worker_env(slot, self._gpus, self._threads)
        log = open(self._out / f"worker{slot}.log", "a")
        # os.pipe() is not inherited: the write end stays here alone, the read end goes to
        # this worker only (pass_fds), so no other child keeps it open after we die.
        watch_r, watch_w = os.pipe()
        self._lifelines.append(watch_w)
        env["BIGBATCH_PARENT_PID"] = str(os.getpid())
        env["BIGBATCH_PARENT_FD"] = str(watch_r)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bigbatch.study.worker"],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                pass_fds=(watch_r,),
            )
        except BaseException:
            log.close()
            raise
        finally:
            os.close(watch_r)
        self._workers.append((proc, log))

        def reader() -> None:
            for line in proc.stdout:  # one JSON answer per cell; EOF when the worker exits
                self._answers.put((slot, json.loads(line)))
            self._answers.put((slot, None))

        threading.Thread(target=reader, daemon=True).start()
        return slot

    def submit(self, job: CellJob) -> None:
        idle = [s for s in range(len(self._workers)) if s not in self._busy]
        slot = idle[0] if idle else self._start_worker()
        self._busy[slot] = job
        proc = self._workers[slot][0]
        proc.stdin.write(f"{job.cell_dir}\n")
        proc.stdin.flush()

    def next_finished(self) -> tuple[CellJob, dict[str, Any]]:
        while True:
            try:
                slot, answer = self._answers.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
            except queue_mod.Empty:
                continue
            job = self._busy.pop(slot, None)
            if job is None:  # an idle worker ended (it cannot: only close() ends them)
                continue
            log = self._out / f"worker{slot}.log"
            if answer is None:
                raise RuntimeError(f"study worker {slot} exited while running {job.cell.name}; see {log}")
            record = answer.get("record") if answer["ok"] else None
            if record is None:
                raise ValueError(f"cell {job.cell.name} failed: {answer.get('error', 'no result')}; log: {log}")
            return job, record

    def close(self, *, clean: bool) -> None:
        for proc, _ in self._workers:
            if proc.poll() is None:
                if clean:
                    proc.stdin.close()  # the worker exits at end of input
                else:  # interrupted or failed: stop the running cells now
                    proc.terminate()
        for proc, log in self._workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        for fd in self._lifelines:
            os.close(fd)
        self._workers, self._lifelines = [], []


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where a GPU is visible, else ``cpu``; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def visible_gpus(device: str) -> list[str]:
    """The GPU ids the cells of a ``device`` study may use (empty on a CPU); ``ValueError`` if cuda has none."""
    if not device.startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    if device.startswith("cuda:"):
        return [device.split(":", 1)[1]]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else []
    n = torch.cuda.device_count()
    return ids[:n] if ids else [str(i) for i in range(n)]


def plan_workers(cfg: Any, gpus: list[str], cpu_count: int, cells_per_gpu: int = 1) -> tuple[int, int | None]:
    """``(jobs, cells_per_gpu)``: how many worker processes run cells at once, and how many share a GPU.

    With GPUs: ``cfg.jobs`` if given (spread over the GPUs in turn), else ``cells_per_gpu`` per
    GPU (the driver passes the flag, else the workload's preset, else 1). On a CPU
    ``cfg.cells_per_gpu`` has no meaning and is refused; the default there is one
    single-threaded worker per core, at most 8, which beats one multi-threaded process for the
    small models a CPU study can afford.
    """
    if not gpus:
        if cfg.cells_per_gpu is not None:
            raise ValueError("cells_per_gpu (--cells-per-gpu) applies to --device cuda; this study runs on the CPU, "
                             "where --jobs sets the cells run at once")
        return cfg.jobs or min(8, cpu_count), None
    if cfg.jobs:
        return cfg.jobs, None
    return len(gpus) * cells_per_gpu, cells_per_gpu


def make_executor(cfg: Any, out: Path, workload: Any, run_cell_fn: Callable[..., dict[str, Any]] | None = None, *,
                  cells_per_gpu: int = 1) -> tuple[Executor, str, int, int | None]:
    """The executor ``cfg`` (a resolved ``StudyConfig``) asks for, the device its cells train on,
    its width (for the display) and the cells sharing each GPU (None on a CPU).

    ``cells_per_gpu`` is the study's GPU sharing (the flag, else the workload's preset, else 1),
    resolved by the driver; ``run_cell_fn`` replaces the in-process cell runner (tests).
    """
    if cfg.executor == "ray":
        from bigbatch.study.ray_executor import RayExecutor

        ex = RayExecutor(cfg, out, cells_per_gpu=cells_per_gpu)
        return ex, ex.device, ex.capacity(), (cells_per_gpu if ex.device == "cuda" else None)
    device = resolve_device(cfg.device)
    gpus = visible_gpus(device)
    jobs, per_gpu = plan_workers(cfg, gpus, os.cpu_count() or 1, cells_per_gpu)
    if jobs > 1:
        return WorkerPoolExecutor(jobs, gpus, out), ("cuda" if gpus else device), jobs, per_gpu
    return InProcessExecutor(workload, run_cell_fn), device, 1, per_gpu

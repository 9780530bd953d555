"""A study's cells as Ray tasks (``bigbatch study --executor ray``), one task per cell.

Ray is imported here only, inside the functions that need it: the core, the driver and the
local executors never import it (``pip install bigbatch[ray]`` brings it).

What travels: the task gets the cell's ``cell.json`` content (its TrainConfig as a dict, the
attempt token) and runs it with bigbatch as installed on the worker, in a temporary directory
there; it returns the record and the files of its run directory as bytes, which the driver
writes into ``cells/<cell>/run-<attempt>/`` before it writes ``result.json``. So no shared file
system is needed, and as with the local executors only the driver writes the study directory.
The model's checkpoints stay behind (nothing in a study reads them, and on a language model
they are most of the bytes).

A task asks for one GPU, or ``1/cells_per_gpu`` of one where several cells share a GPU, or
``ray_cpus_per_cell`` CPUs. A worker process or node that dies mid-cell is noticed by the
driver, which starts the cell again (from scratch, as a killed local cell is) up to
``cell_retries`` times; Ray's own task retries are off, so the driver holds exactly one
reference per running cell and a result can only be counted once. A cell that raises is not
retried: its error would recur. Ray ends a driver's tasks when the driver dies (Ray's
ownership model), as the local workers die with theirs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from bigbatch.study.cells import attempt_dir, run_cell
from bigbatch.study.executors import CellJob

__all__ = ["RayExecutor", "import_ray", "check_address", "run_cell_task", "gpus_per_cell"]

#: Where a task trains its cell on a worker host, one subdirectory per task (``<pid>-…``).
SCRATCH = "bigbatch-cells"


def import_ray() -> Any:
    """The ``ray`` module, or a ``ValueError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("executor ray needs Ray, which is not installed: pip install 'bigbatch[ray]'") from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """``ValueError`` unless something listens at the Ray address ``address`` (host:port, ray://host:port).

    ``ray.init`` retries an unreachable address for minutes; this says at once what is wrong.
    ``auto`` and ``local`` are left to Ray.
    """
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"ray_address must be host:port, ray://host:port or auto, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ValueError(f"ray_address {address}: no Ray cluster answers there ({e.strerror or e}); "
                         f"start its head with `ray start --head` or check the address") from None


def gpus_per_cell(cfg: Any) -> float:
    """The GPU share of one cell's task: ``1 / cells_per_gpu`` (the flag, else the workload's preset, else 1)."""
    from bigbatch.study.runner import cells_per_gpu

    return 1.0 / float(cells_per_gpu(cfg))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_orphans(root: Path) -> None:
    """Delete the scratch directories of tasks whose process is gone (killed mid-cell)."""
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def run_cell_task(name: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one cell where this function is called (a Ray worker) and return its record and files.

    ``spec`` is the driver's ``cell.json``; the trainer writes into a scratch directory here
    instead of the driver's ``train.out``, and the record and ``summary.json`` are given the
    driver's paths back, so the cell's files read the same as those of a local run.
    """
    import torch

    from bigbatch.train.checkpoint import write_json_atomic

    if threads > 0:
        torch.set_num_threads(threads)
    root = Path(tempfile.gettempdir()) / SCRATCH
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(root)
    work = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    try:
        cell_dir = work / name
        run_dir = attempt_dir(cell_dir, spec["attempt"])
        cell_dir.mkdir()
        driver_out = spec["train"]["out"]
        (cell_dir / "cell.json").write_text(json.dumps({**spec, "train": {**spec["train"], "out": str(run_dir)}}))
        record = run_cell(cell_dir)
        record["train"] = spec["train"]
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if isinstance(summary.get("config"), dict):
                summary["config"]["out"] = driver_out
            write_json_atomic(summary, summary_path)
        files = {}
        for p in sorted(run_dir.rglob("*")):
            rel = p.relative_to(run_dir)
            if p.is_file() and rel.parts[0] != "checkpoints":
                files[rel.as_posix()] = p.read_bytes()
        return {"record": record, "files": files, "host": socket.gethostname()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """A returned cell's files into ``run_dir`` on the driver, each atomically."""
    from bigbatch._files import _atomic

    root = run_dir.resolve()
    for rel, data in files.items():
        path = (run_dir / rel).resolve()
        if not path.is_relative_to(root):  # a name from the worker never writes outside the cell
            raise ValueError(f"cell file {rel!r} lies outside {run_dir}")
        _atomic(path, "cell file", lambda tmp, data=data: tmp.write_bytes(data))


class RayExecutor:
    """Cells as Ray tasks; see the module doc. Connects (or starts Ray) when constructed."""

    def __init__(self, cfg: Any, out: Path) -> None:
        ray = import_ray()
        self._ray = ray
        self._out = out
        self._jobs = int(cfg.jobs)
        self._retries = int(cfg.cell_retries)
        self.on_note: Callable[[str], None] | None = None
        self._running: dict[Any, tuple[CellJob, int]] = {}  # object ref → (job, restarts so far)
        self._owns_ray = not ray.is_initialized()
        if not self._owns_ray and cfg.ray_address is not None:
            raise ValueError(f"ray_address {cfg.ray_address} was given but this process is already connected to "
                             f"a Ray cluster (ray.init was called); leave ray_address unset to use that one")
        if self._owns_ray:
            if cfg.ray_address is not None:
                check_address(cfg.ray_address)
            # No address: Ray's own order (RAY_ADDRESS, a cluster started on this host, else a new one).
            try:
                ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False,
                         logging_level=logging.WARNING)
            except ConnectionError as e:
                where = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "(none given)"
                raise ValueError(f"ray_address {where}: cannot connect to the Ray cluster: {e}") from None
        resources = ray.cluster_resources()
        n_gpus = float(resources.get("GPU", 0))
        device = cfg.device
        if device == "auto":
            device = "cuda" if n_gpus > 0 else "cpu"
        elif device.startswith("cuda:"):
            self.close(clean=False)
            raise ValueError(f"device {device} names one GPU of this host; device must be cuda, cpu or auto "
                             f"with the Ray executor (Ray gives each cell its GPU)")
        if device == "cuda" and n_gpus <= 0:
            self.close(clean=False)
            raise ValueError("device cuda was asked for but the Ray cluster has no GPUs; device must be cpu or auto there")
        self.device = device
        self._gpu = gpus_per_cell(cfg) if device == "cuda" else 0.0
        self._cpus = float(cfg.ray_cpus_per_cell)
        if self._gpu == 0.0 and self._cpus <= 0:
            self.close(clean=False)
            raise ValueError("ray_cpus_per_cell must be > 0 for cells on CPUs, got 0")
        self._threads = max(1, int(self._cpus))
        self._task = ray.remote(run_cell_task).options(
            num_gpus=self._gpu, num_cpus=self._cpus, max_retries=0, retry_exceptions=False)

    def capacity(self) -> int:
        if self._jobs > 0:
            return self._jobs
        resources = self._ray.cluster_resources()
        fits = []
        if self._gpu > 0:
            fits.append(float(resources.get("GPU", 0)) / self._gpu)
        if self._cpus > 0:
            fits.append(float(resources.get("CPU", 0)) / self._cpus)
        return max(1, int(min(fits) + 1e-9))

    def _start(self, job: CellJob, restarts: int) -> None:
        spec = json.loads((job.cell_dir / "cell.json").read_text())
        ref = self._task.remote(job.cell.name, spec, self._threads)
        self._running[ref] = (job, restarts)

    def submit(self, job: CellJob) -> None:
        self._start(job, 0)

    def next_finished(self) -> tuple[CellJob, dict[str, Any]]:
        ray = self._ray
        while True:
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=0.5)  # a timeout keeps Ctrl-C responsive
            if not ready:
                continue
            ref = ready[0]
            job, restarts = self._running.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the cell itself raised: it would again
                cause = e.cause if getattr(e, "cause", None) is not None else e
                msg = str(cause) if isinstance(cause, ValueError) else f"{type(cause).__name__}: {cause}"
                raise ValueError(f"cell {job.cell.name} failed on the Ray cluster: {msg}") from None
            except ray.exceptions.TaskCancelledError:
                raise
            except ray.exceptions.RayError as e:  # its worker process or node died
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if restarts >= self._retries:
                    raise RuntimeError(f"cell {job.cell.name}: its Ray worker died {restarts + 1} times "
                                       f"(last: {type(e).__name__}: {reason}); cell_retries is {self._retries}") from None
                if self.on_note is not None:
                    self.on_note(f"{job.cell.name}: its Ray worker died ({type(e).__name__}); "
                                 f"starting it again ({restarts + 1}/{self._retries})")
                self._start(job, restarts + 1)
                continue
            _write_files(attempt_dir(job.cell_dir, job.attempt), answer["files"])
            return job, answer["record"]

    def close(self, *, clean: bool) -> None:
        ray = self._ray
        if not clean:
            for ref in list(self._running):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or its worker gone: nothing to stop
                    pass
        self._running.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

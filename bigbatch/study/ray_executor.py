"""A study's cells on Ray (``bigbatch study --executor ray``): one long-lived worker per cell slot.

Ray is imported here only, inside the functions that need it: the core, the driver and the
local executors never import it (``pip install bigbatch[ray]`` brings it). This module imports
no other executor module: ``executors.make_executor`` imports it, not the reverse.

What travels: a cell gets its ``cell.json`` content (its TrainConfig as a dict, the attempt
token) and runs with bigbatch as installed on the worker, in a temporary directory there; it
returns the record and the files of its run directory as bytes, which the driver writes into
``cells/<cell>/run-<attempt>/`` before it writes ``result.json``. So no shared file system is
needed, and as with the local executors only the driver writes the study directory. The model's
checkpoints stay behind (nothing in a study reads them, and on a language model they are most
of the bytes).

Workers: each slot is a Ray actor (``CellWorker``) asking for one GPU, or ``1/cells_per_gpu`` of
one where several cells share a GPU, or ``ray_cpus_per_cell`` CPUs; it runs cell after cell in
one process, as the local worker pool does. A Ray *task* that asks for a GPU gets a fresh worker
process per call (Ray's ``max_calls`` defaults to 1 for GPU tasks), so each cell paid for starting
Python, importing torch and a CUDA context again. A long-lived worker must not carry memory from
one cell to the next: after every cell it frees what it can (``gc``, the CUDA cache) and reports
the device memory still allocated (on a CPU: the bytes of live tensors); from its second cell on,
more than ``LEAK_TOLERANCE_BYTES`` above what it held after its first cell (cuBLAS workspaces and
the like stay from then on) counts as a leak, and the driver replaces that worker (the cell's
result stands: it was complete before the leak was measured). ``ray-workers.jsonl`` in the study
directory lists, per cell, the worker (host, pid), its memory after the cell and whether it was
replaced.

Retries: a worker process or node that dies mid-cell is noticed by the driver, which starts the
cell again on a fresh worker (from scratch, as a killed local cell is) up to ``cell_retries``
times; Ray's own restarts and retries are off, so the driver holds exactly one reference per
running cell and a result can only be counted once. A cell that raises is not retried: its error
would recur. Ray ends a driver's actors when the driver dies (Ray's ownership model), as the
local workers die with theirs.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bigbatch.study.cells import attempt_dir, run_cell

if TYPE_CHECKING:  # the type only: executors.py imports this module
    from bigbatch.study.executors import CellJob

__all__ = ["RayExecutor", "CellWorker", "import_ray", "check_address", "run_cell_task", "gpus_per_cell",
           "held_bytes", "LEAK_TOLERANCE_BYTES"]

#: Memory a worker may hold after a cell above what it held after its first cell, before it is replaced.
LEAK_TOLERANCE_BYTES = 64 * 2**20

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


def gpus_per_cell(cfg: Any, default: int = 1) -> float:
    """The GPU share of one cell's worker: ``1 / cells_per_gpu`` (the flag, else ``default``: the driver
    passes the workload's preset)."""
    return 1.0 / float(getattr(cfg, "cells_per_gpu", None) or default)


def held_bytes() -> int:
    """Memory still held after a cell, once garbage is collected: CUDA bytes allocated where CUDA is
    in use, else the bytes of the CPU tensors still alive (found through the garbage collector)."""
    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return int(sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count())))
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance on some lazily deprecated objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu" or obj.is_sparse:
                    continue
                storage = obj.untyped_storage()
            except Exception:  # an object whose type check or storage raises: not a tensor we can count
                continue
            key = storage.data_ptr()
            if key and key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


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


class CellWorker:
    """A Ray actor that runs cells one after another in one process (see the module doc).

    ``run`` returns ``run_cell_task``'s answer plus the worker's ``pid``, the memory it ``held``
    after the cell and ``leaked``: how much more than after its first cell (0 for the first).
    """

    def __init__(self, threads: int) -> None:
        self._threads = int(threads)
        self._baseline: int | None = None

    def run(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        answer = run_cell_task(name, spec, self._threads)
        held = held_bytes()
        if self._baseline is None:
            self._baseline = held
        answer.update(pid=os.getpid(), held=held, leaked=max(0, held - self._baseline))
        return answer


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
    """Cells on long-lived Ray actors, one per cell slot; see the module doc. Connects (or starts Ray) when constructed.

    ``cells_per_gpu`` is the GPU sharing the driver resolved (the flag, else the workload's preset).
    """

    def __init__(self, cfg: Any, out: Path, *, cells_per_gpu: int = 1) -> None:
        ray = import_ray()
        self._ray = ray
        self._out = out
        self._jobs = int(cfg.jobs)
        self._retries = int(cfg.cell_retries)
        self.on_note: Callable[[str], None] | None = None
        self._running: dict[Any, tuple[CellJob, int, Any]] = {}  # object ref → (job, restarts so far, its actor)
        self._idle: list[Any] = []  # actors waiting for a cell
        self._actors: list[Any] = []  # every live actor (idle or running), for close()
        self.workers_started = 0
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
        self._gpu = gpus_per_cell(cfg, cells_per_gpu) if device == "cuda" else 0.0
        self._cpus = float(cfg.ray_cpus_per_cell)
        if self._gpu == 0.0 and self._cpus <= 0:
            self.close(clean=False)
            raise ValueError("ray_cpus_per_cell must be > 0 for cells on CPUs, got 0")
        self._threads = max(1, int(self._cpus))
        # No restarts, no task retries: a dead worker's cell is restarted by this driver, once per death.
        self._worker_cls = ray.remote(CellWorker).options(
            num_gpus=self._gpu, num_cpus=self._cpus, max_restarts=0, max_task_retries=0)
        self._log = out / "ray-workers.jsonl"

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

    def _worker(self) -> Any:
        if self._idle:
            return self._idle.pop()
        actor = self._worker_cls.remote(self._threads)
        self._actors.append(actor)
        self.workers_started += 1
        return actor

    def _retire(self, actor: Any) -> None:
        """Stop ``actor`` (dead already, leaking, or no longer needed)."""
        if actor in self._actors:
            self._actors.remove(actor)
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _start(self, job: CellJob, restarts: int) -> None:
        spec = json.loads((job.cell_dir / "cell.json").read_text())
        actor = self._worker()
        ref = actor.run.remote(job.cell.name, spec)
        self._running[ref] = (job, restarts, actor)

    def submit(self, job: CellJob) -> None:
        self._start(job, 0)

    def _note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)

    def next_finished(self) -> tuple[CellJob, dict[str, Any]]:
        ray = self._ray
        while True:
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=0.5)  # a timeout keeps Ctrl-C responsive
            if not ready:
                continue
            ref = ready[0]
            job, restarts, actor = self._running.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the cell itself raised: it would again
                self._idle.append(actor)
                cause = e.cause if getattr(e, "cause", None) is not None else e
                msg = str(cause) if isinstance(cause, ValueError) else f"{type(cause).__name__}: {cause}"
                raise ValueError(f"cell {job.cell.name} failed on the Ray cluster: {msg}") from None
            except ray.exceptions.TaskCancelledError:
                raise
            except ray.exceptions.RayError as e:  # its worker process or node died
                self._retire(actor)
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if restarts >= self._retries:
                    raise RuntimeError(f"cell {job.cell.name}: its Ray worker died {restarts + 1} times "
                                       f"(last: {type(e).__name__}: {reason}); cell_retries is {self._retries}") from None
                self._note(f"{job.cell.name}: its Ray worker died ({type(e).__name__}); "
                           f"starting it again ({restarts + 1}/{self._retries})")
                self._start(job, restarts + 1)
                continue
            leaked = int(answer.get("leaked", 0))
            replaced = leaked > LEAK_TOLERANCE_BYTES
            if replaced:
                self._retire(actor)
                self._note(f"{job.cell.name}: its Ray worker (pid {answer.get('pid')} on {answer.get('host')}) still holds "
                           f"{leaked / 2**20:.0f} MiB more than after its first cell; replaced it with a fresh one")
            else:
                self._idle.append(actor)
            _write_files(attempt_dir(job.cell_dir, job.attempt), answer["files"])
            with open(self._log, "a") as f:
                f.write(json.dumps({"cell": job.cell.name, "attempt": job.attempt, "host": answer.get("host"),
                                    "pid": answer.get("pid"), "held_bytes": answer.get("held"),
                                    "leaked_bytes": leaked, "replaced": replaced}) + "\n")
            return job, answer["record"]

    def close(self, *, clean: bool) -> None:
        ray = self._ray
        # Running cells (an interrupt, a failure) stop with their actors; idle actors are let go.
        for actor in list(getattr(self, "_actors", [])):
            self._retire(actor)
        self._running.clear()
        self._idle.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

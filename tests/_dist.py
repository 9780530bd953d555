"""Multi-process CPU tests on one gloo process group: spawn the workers, wait, collect their results.

``spawn_gloo(fn, *args)`` starts ``world`` processes (spawn: a fresh interpreter each), joins them
in a gloo group through a ``file://`` rendezvous and runs ``fn(rank, *args)`` in each; whatever
``fn`` returns (JSON-serialisable) comes back as one list in rank order. ``fn`` must be a
module-level function, so that the spawned processes can import it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist


class WorkerError(RuntimeError):
    """A worker raised; the message holds the traceback of every rank that did (rank order), since the
    first to die is often only the peer that lost its connection."""


def _entry(rank: int, fn: Callable[..., Any], world: int, init_file: str, result_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(fn(rank, *args)))
        dist.barrier()  # neither rank tears gloo down while the other finishes its last collective
        dist.destroy_process_group()
        # Skip the interpreter's teardown: gloo's static objects can abort a worker at exit
        # ("terminate called without an active exception") after all the work is done.
        os._exit(0)
    except BaseException:
        Path(result_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_gloo(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 120.0) -> list[Any]:
    """``[fn(0, *args), …, fn(world − 1, *args)]``, each computed in its own process of one gloo group.

    A worker that raises fails the call with :class:`WorkerError` (the other workers are terminated);
    workers still running after ``timeout`` seconds are killed and the test fails. Skips the test
    where worker processes cannot be started (sandboxes).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        try:
            ctx = mp.start_processes(_entry, args=(fn, world, os.path.join(d, "init"), d, args), nprocs=world,
                                     join=False, start_method="spawn")
        except (RuntimeError, OSError) as e:  # pragma: no cover - sandboxed machines
            pytest.skip(f"cannot start worker processes: {e}")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"{fn.__name__}: {world} gloo workers did not finish in {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            tbs = [f"--- rank {r} ---\n{f.read_text()}" for r in range(world) if (f := Path(d, f"rank{r}.err")).exists()]
            raise WorkerError(f"{fn.__name__} failed in a gloo worker:\n" + "\n".join(tbs or [str(e)])) from e
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]

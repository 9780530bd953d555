"""A study worker process: ``python -m bigbatch.study.worker`` runs the cells named on its stdin.

Kept apart from ``cells.py`` so that running it with ``-m`` does not import it twice (the
package ``bigbatch.study`` imports ``cells``).

A worker never outlives the study that started it: a worker left running after its driver
was killed would go on training (and writing) for nothing. ``die_with_parent`` ties the two
together in two ways: on Linux the kernel sends the worker SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), and everywhere a thread blocks on a pipe whose write end only
the driver holds — when the driver dies, however it dies, the read returns end-of-file and
the worker exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from bigbatch.study.cells import run_cell

__all__ = ["die_with_parent", "watch_lifeline"]


def _set_parent_death_signal() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent exits; False elsewhere.

    Note the kernel's meaning of "parent": the *thread* that forked us. The driver starts its
    workers from the thread that then waits for them, so the two end together.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        return libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_lifeline(fd: int) -> threading.Thread:
    """Exit this process as soon as the pipe ``fd`` reaches end-of-file (its writer is gone).

    ``os._exit``: nothing of the cell being trained is worth saving (the driver that would use
    it is gone, and the next run restarts unfinished cells), and a normal exit would wait for
    the training thread.
    """

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 4096):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        print("study worker: the study driver is gone; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    t = threading.Thread(target=watch, name="bigbatch-lifeline", daemon=True)
    t.start()
    return t


def die_with_parent(parent_pid: int | None, lifeline_fd: int | None) -> None:
    """Make this worker end when the driver process ``parent_pid`` ends (see module doc)."""
    _set_parent_death_signal()
    # The driver may have died before the signal was armed: then we were already re-parented.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)
    if lifeline_fd is not None:
        watch_lifeline(lifeline_fd)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def _worker() -> int:
    """Run cells named one per line on stdin; answer one JSON line per cell (its record) on the original stdout.

    The trainer's own prints go to stderr (the worker's log), so the protocol channel stays clean.
    A worker is started once per GPU (or CPU slot) and keeps its imports warm (the
    workload's data come from the on-disk cache).
    """
    die_with_parent(_env_int("BIGBATCH_PARENT_PID"), _env_int("BIGBATCH_PARENT_FD"))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    threads = os.environ.get("BIGBATCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    for line in sys.stdin:
        cell_dir = line.strip()
        if not cell_dir:
            continue
        try:
            # The driver, not this worker, writes result.json (cells.write_result).
            answer = {"cell_dir": cell_dir, "ok": True, "record": run_cell(cell_dir)}
        except Exception as e:  # reported to the parent, which stops the study with this message
            import traceback

            traceback.print_exc()
            answer = {"cell_dir": cell_dir, "ok": False, "error": f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)}
        proto.write(json.dumps(answer) + "\n")
    return 0


def _main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m bigbatch.study.worker  (cell directories on stdin, one per line)", file=sys.stderr)
        return 2
    try:
        return _worker()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

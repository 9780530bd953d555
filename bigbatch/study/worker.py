"""A study worker process: ``python -m bigbatch.study.worker`` runs the cells named on its stdin.

Kept apart from ``cells.py`` so that running it with ``-m`` does not import it twice (the
package ``bigbatch.study`` imports ``cells``).
"""

from __future__ import annotations

import json
import os
import sys

from bigbatch.study.cells import run_cell

__all__: list[str] = []


def _worker() -> int:
    """Run cells named one per line on stdin; answer one JSON line per cell on the original stdout.

    The trainer's own prints go to stderr (the worker's log), so the protocol channel stays clean.
    A worker is started once per GPU (or CPU slot) and keeps its imports warm (the
    workload's data come from the on-disk cache).
    """
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
            run_cell(cell_dir)
            answer = {"cell_dir": cell_dir, "ok": True}
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

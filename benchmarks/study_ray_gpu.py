"""Cells per hour of a bytelm study under ``--executor ray`` against the local executor, on one GPU.

Runs the same bytelm sweep (the 8 cells of BENCHMARKS.md's cells-per-GPU table: batch sizes
32–256, LR ×1 and ×2, seed 0, 4 cells per GPU) in alternating pairs — local, Ray, local, Ray, … —
each into a fresh directory, and prints per run the cells per hour (results.json ``timing``) and
the wall time, then the median of each executor over ``--pairs`` pairs and their ratio (issue
29's goal: Ray ≥ 97% of local). Ray is started once, before the first pair, with this host's
GPUs (its start-up is not a cell's cost); each Ray study starts its own long-lived workers
(actors), so their start-up is counted, once per slot. It also checks, per Ray run, that the
cells equal the local run's (same keys as tests/test_study_ray.py) and reports the largest
memory a worker held above its first cell (ray-workers.jsonl).

    python benchmarks/study_ray_gpu.py                 # 3 pairs, into runs/study_ray_gpu
    python benchmarks/study_ray_gpu.py --pairs 5 --out /tmp/rg

Needs a CUDA GPU and Ray (pip install 'bigbatch[ray]'). A directory that already holds a study
is refused (nothing is overwritten): pass another ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bigbatch.study import StudyConfig, run_study

SWEEP = dict(workload="bytelm", device="cuda", batch_sizes=[32, 64, 128, 256], lr_grid=[1.0, 2.0], lr_extend=0,
             seeds=[0], cells_per_gpu=4, progress="none")
CELL_KEYS = ("name", "reached_target", "steps_to_target", "samples_to_target", "steps", "samples", "stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternating local/Ray pairs (default 3)")
    ap.add_argument("--out", default="runs/study_ray_gpu", help="parent directory of the runs")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("study_ray_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import ray
    except ImportError:
        print("study_ray_gpu: needs Ray: pip install 'bigbatch[ray]'", file=sys.stderr)
        return 2
    if args.pairs < 1:
        print(f"study_ray_gpu: --pairs must be >= 1, got {args.pairs}", file=sys.stderr)
        return 2
    root = Path(args.out)
    for i in range(args.pairs):
        for ex in ("local", "ray"):
            if (root / f"{ex}-{i}" / "study.json").exists():
                print(f"study_ray_gpu: {root / f'{ex}-{i}'} already holds a study; pass another --out", file=sys.stderr)
                return 2
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    rates: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        for i in range(args.pairs):
            cells = {}
            for ex in ("local", "ray"):
                out = root / f"{ex}-{i}"
                t0 = time.perf_counter()
                res = run_study(StudyConfig(executor=ex, out=str(out), **SWEEP))
                wall = time.perf_counter() - t0
                t = res["timing"]
                rates[ex].append(t["cells_per_hour"])
                cells[ex] = {c["name"]: {k: c.get(k) for k in CELL_KEYS} for c in res["cells"]}
                extra = ""
                if ex == "ray":
                    log = [json.loads(x) for x in (out / "ray-workers.jsonl").read_text().splitlines()]
                    extra = (f", {len({(e['host'], e['pid']) for e in log})} worker processes, largest held above the first "
                             f"cell {max(e['leaked_bytes'] for e in log) / 2**20:.1f} MiB, replaced {sum(e['replaced'] for e in log)}")
                print(f"pair {i} {ex:5}: {t['cells']} cells, {t['cells_per_hour']:.0f} cells/hour, wall {wall:.1f} s{extra}")
            same = sum(cells["ray"].get(k) == v for k, v in cells["local"].items())
            print(f"pair {i}: {same}/{len(cells['local'])} cells identical between the executors")
    finally:
        ray.shutdown()
    med = {ex: statistics.median(v) for ex, v in rates.items()}
    print(f"\nmedian of {args.pairs}: local {med['local']:.0f} cells/hour, ray {med['ray']:.0f} cells/hour, "
          f"ray/local {med['ray'] / med['local']:.3f} (goal >= 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

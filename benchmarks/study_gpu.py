"""Cells per hour of the bytelm study on a GPU, at several ``--cells-per-gpu``; and the full study.

Runs ``bigbatch study --workload bytelm --device cuda`` (the preset: 6 batch sizes 16…512, 3
bits-per-byte targets, LR grid ×0.5/1/2 with extensions) once per value of ``--cells-per-gpu``
on the same sweep, each into its own directory, and prints per run the wall time, the cells
trained, cells per hour (results.json ``timing``) and B_crit and B_simple per target; then the
gain of each value over the first. By default the sweep is the preset with one seed and no LR
extension (18 cells), so that two values fit in about 10 minutes; ``--full`` runs the study the
issue asks for (seeds 0 and 1, extensions on) once per value.

    python benchmarks/study_gpu.py                         # cells per GPU 1 and 4, 18-cell subset
    python benchmarks/study_gpu.py --cells-per-gpu 1,2,4,8
    python benchmarks/study_gpu.py --full --cells-per-gpu 4  # the whole study, timed

A directory that already holds a study is refused (nothing is overwritten): pass another
``--out`` or delete it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bigbatch.study import StudyConfig, run_study


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells-per-gpu", default="1,4", help="comma-separated values to compare (default 1,4)")
    ap.add_argument("--full", action="store_true", help="seeds 0,1 and LR extensions (the issue's study) instead of the subset")
    ap.add_argument("--out", default="runs/study_gpu", help="parent directory of the runs (one per value)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("study_gpu: needs a CUDA GPU (cells per GPU has no meaning on a CPU)", file=sys.stderr)
        return 2
    values = [int(v) for v in args.cells_per_gpu.split(",") if v.strip()]
    sweep = dict(seeds=[0, 1], lr_extend=2) if args.full else dict(seeds=[0], lr_extend=0)
    rows = []
    for n in values:
        out = Path(args.out) / f"{'full' if args.full else 'subset'}-cpg{n}"
        if (out / "study.json").exists():
            print(f"study_gpu: {out} already holds a study; pass another --out", file=sys.stderr)
            return 2
        cfg = StudyConfig(workload="bytelm", device="cuda", cells_per_gpu=n, progress="lines", out=str(out), **sweep)
        t0 = time.perf_counter()
        res = run_study(cfg)
        wall = time.perf_counter() - t0
        t = res["timing"]
        rows.append((n, wall, t["cells"], t["cells_per_hour"]))
        print(f"\n== cells per GPU {n}: {t['cells']} cells in {wall / 60:.2f} min, {t['cells_per_hour']:.0f} cells/hour "
              f"({t['workers']} workers) -> {out}")
        for e in res.get("by_target") or []:
            iv = e.get("b_crit_interval")
            ivs = f" ({iv[0]:.0f}-{iv[1]:.0f})" if iv else ""
            crit = f"{e['b_crit']:.0f}{ivs}" if e.get("b_crit") is not None else f"undetermined ({e.get('b_crit_undetermined')})"
            print(f"   target {e['target']:g} bpb: B_crit {crit}; B_simple {_fmt(e.get('b_simple'))}; "
                  f"cells reached {e['cells_reached']}; worst resolution {_fmt(e.get('resolution_max'), '.1%')}")
        for note in res["notes"]:
            print(f"   note: {note}")
    if len(rows) > 1:
        base = rows[0]
        print("\ncells per GPU | wall min | cells | cells/hour | gain")
        for n, wall, cells, cph in rows:
            print(f"{n:>13} | {wall / 60:8.2f} | {cells:5d} | {cph:10.0f} | {cph / base[3]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

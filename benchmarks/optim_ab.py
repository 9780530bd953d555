"""A/B step time of bigbatch's fused optimizers between two source trees, on one GPU (CUDA).

Single calls of ``optim_step.py`` move by ±15 % between machines and minutes, more than most
kernel changes; this compares two versions of the package **in the same call, interleaved**.
Each round runs one short subprocess per tree (A, B, then B, A in the next round, so drift
cancels on average); a subprocess times ``--opts`` and fused AdamW (the yardstick) on the
GPT-2-shaped parameter sets of ``optim_step.py`` and prints medians. The table gives, per
optimizer and size, the median over rounds of ms/step and of the ratio to AdamW measured in the
same subprocess.

    # B = another version of the package, e.g. a branch's files copied into the tree:
    mkdir -p _ab/b && git archive BRANCH bigbatch | tar -x -C _ab/b
    python benchmarks/optim_ab.py --b _ab/b --rounds 4 --opts merit,lamb
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(opts: list[str], sizes: list[str], iters: int) -> None:
    """Inside a subprocess: time fused AdamW and ``opts`` (fused) on each size; print JSON."""
    import torch

    sys.path.insert(0, str(HERE))
    import optim_step as B

    import bigbatch

    out = {"bigbatch": bigbatch.__file__, "ms": {}}
    names = {"adamw": "torch AdamW fused", "lars": "bigbatch LARS fused", "lamb": "bigbatch LAMB fused",
             "merit": "bigbatch MERIT fused"}
    builders = B.builders()
    for size in sizes:
        for key in ["adamw", *opts]:
            ps = B.make_params(B.SIZES[size])
            opt = builders[names[key]][1](ps)
            out["ms"][f"{size}/{key}"] = B.time_steps(opt, warmup=3, iters=iters)
            del opt, ps
            torch.cuda.empty_cache()
    print(json.dumps(out))


def run_tree(root: str, opts: list[str], sizes: list[str], iters: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    cmd = [sys.executable, __file__, "--child", "--opts", ",".join(opts), "--sizes", ",".join(sizes),
           "--iters", str(iters)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"tree {root}: child failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default=".", help="tree holding package A (default: this checkout)")
    ap.add_argument("--b", required=False, help="tree holding package B (a directory with bigbatch/ in it)")
    ap.add_argument("--opts", default="merit", help="comma list of: lars, lamb, merit")
    ap.add_argument("--sizes", default="124m,1.5b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    opts = [o for o in a.opts.split(",") if o]
    bad = [o for o in opts if o not in ("lars", "lamb", "merit")]
    if bad:
        raise SystemExit(f"--opts: unknown {bad}; allowed: lars, lamb, merit")
    sizes = [s for s in a.sizes.split(",") if s]
    if a.child:
        child(opts, sizes, a.iters)
        return
    if not a.b:
        raise SystemExit("--b is required: the tree holding the other version of the package")
    if a.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {a.rounds}")
    trees = {"A": a.a, "B": a.b}
    res: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(a.rounds):
        for t in ("A", "B") if r % 2 == 0 else ("B", "A"):
            out = run_tree(trees[t], opts, sizes, a.iters)
            res[t].append(out["ms"])
            print(f"round {r} {t} ({out['bigbatch']}): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in out["ms"].items()), flush=True)
    print("\n| size | optimizer | A ms | B ms | A × AdamW | B × AdamW | B / A |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        for key in opts:
            k, ka = f"{size}/{key}", f"{size}/adamw"
            ms = {t: statistics.median(x[k] for x in res[t]) for t in res}
            rel = {t: statistics.median(x[k] / x[ka] for x in res[t]) for t in res}
            ba = statistics.median(xb[k] / xa[k] for xa, xb in zip(res["A"], res["B"]))
            print(f"| {size} | {key} | {ms['A']:.3f} | {ms['B']:.3f} | {rel['A']:.2f}x | {rel['B']:.2f}x | {ba:.3f} |")


if __name__ == "__main__":
    main()

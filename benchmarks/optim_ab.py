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
    # several B trees (B1, B2, ...), each compared with A:
    python benchmarks/optim_ab.py --b _ab/b1,_ab/b2 --opts merit
    # MERIT's tile shape (rows x columns x warps), each timed as its own row in every subprocess:
    python benchmarks/optim_ab.py --b _ab/b --opts merit --tiles 32x128x8,64x64x8
    # LAMB's / LARS's block (elements x warps per program), likewise:
    python benchmarks/optim_ab.py --b _ab/b --opts lamb,lars --blocks 4096x8,2048x4

A tile shape or block is set on the kernel module (``TILE_M``, ``TILE_N``, ``TILE_WARPS``;
``BLOCK``, ``BLOCK_WARPS``) before the optimizer's first step builds its tables; it is a tuning
experiment, not an option of the package.
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


def parse_shapes(flag: str, text: str, fields: tuple[str, ...]) -> list[tuple[int, ...]]:
    """``"32x128x8,64x64x8"`` → [(32, 128, 8), (64, 64, 8)]: per comma item, one power of two
    >= 1 for each of ``fields``; ``flag`` names the option in the error."""
    form = "x".join(f.upper() for f in fields)
    out = []
    for item in (t for t in text.split(",") if t):
        try:
            xs = tuple(int(x) for x in item.split("x"))
        except ValueError:
            xs = ()
        if len(xs) != len(fields):
            raise SystemExit(f"{flag}: {item!r} is not {form}")
        for name, x in zip(fields, xs):
            if x < 1 or x & (x - 1):
                raise SystemExit(f"{flag}: {item!r}: {name} must be a power of two >= 1, got {x}")
        out.append(xs)
    return out


def child(opts: list[str], sizes: list[str], iters: int, tiles: list[tuple[int, ...]],
          blocks: list[tuple[int, ...]]) -> None:
    """Inside a subprocess: time fused AdamW and ``opts`` (fused) on each size; print JSON."""
    import torch

    sys.path.insert(0, str(HERE))
    import optim_step as B

    import bigbatch
    from bigbatch.optim._fused import kernels as K

    out = {"bigbatch": bigbatch.__file__, "ms": {}}
    names = {"adamw": "torch AdamW fused", "lars": "bigbatch LARS fused", "lamb": "bigbatch LAMB fused",
             "merit": "bigbatch MERIT fused"}
    builders = B.builders()
    default = (K.TILE_M, K.TILE_N, K.TILE_WARPS)
    default_block = (K.BLOCK, getattr(K, "BLOCK_WARPS", 8))  # trees before BLOCK_WARPS: 8
    sweep = {"merit": tiles, "lamb": blocks, "lars": blocks}
    runs = [(key, None) for key in ["adamw", *opts] if not sweep.get(key)]
    runs += [(key, t) for key in opts for t in sweep[key]]
    for size in sizes:
        for key, tile in runs:
            K.TILE_M, K.TILE_N, K.TILE_WARPS = tile if key == "merit" and tile else default
            K.BLOCK, K.BLOCK_WARPS = tile if key != "merit" and tile else default_block
            ps = B.make_params(B.SIZES[size])
            opt = builders[names[key]][1](ps)
            name = key if tile is None else f"{key}@{'x'.join(map(str, tile))}"
            out["ms"][f"{size}/{name}"] = B.time_steps(opt, warmup=3, iters=iters)
            del opt, ps
            torch.cuda.empty_cache()
    print(json.dumps(out))


def run_tree(root: str, opts: list[str], sizes: list[str], iters: int, tiles: str, blocks: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    cmd = [sys.executable, __file__, "--child", "--opts", ",".join(opts), "--sizes", ",".join(sizes),
           "--iters", str(iters), "--tiles", tiles, "--blocks", blocks]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"tree {root}: child failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default=".", help="tree holding package A (default: this checkout)")
    ap.add_argument("--b", required=False,
                    help="tree(s) holding package B (directories with bigbatch/ in them; comma list for several)")
    ap.add_argument("--opts", default="merit", help="comma list of: lars, lamb, merit")
    ap.add_argument("--sizes", default="124m,1.5b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiles", default="", help="MERIT tile shapes ROWSxCOLSxWARPS, comma list (default: the tree's)")
    ap.add_argument("--blocks", default="", help="LAMB/LARS blocks ELEMENTSxWARPS, comma list (default: the tree's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    opts = [o for o in a.opts.split(",") if o]
    bad = [o for o in opts if o not in ("lars", "lamb", "merit")]
    if bad:
        raise SystemExit(f"--opts: unknown {bad}; allowed: lars, lamb, merit")
    sizes = [s for s in a.sizes.split(",") if s]
    tiles = parse_shapes("--tiles", a.tiles, ("rows", "columns", "warps"))
    blocks = parse_shapes("--blocks", a.blocks, ("elements", "warps"))
    if any(bn < 4 for _, bn, _ in tiles):
        raise SystemExit(f"--tiles: columns must be >= 4 (16-byte vectors), got {a.tiles!r}")
    if any(block < 32 * nw for block, nw in blocks):
        raise SystemExit(f"--blocks: elements must be >= 32 x warps, got {a.blocks!r}")
    if tiles and "merit" not in opts:
        raise SystemExit("--tiles applies to MERIT: add merit to --opts")
    if blocks and not {"lamb", "lars"} & set(opts):
        raise SystemExit("--blocks applies to LAMB and LARS: add lamb or lars to --opts")
    if a.child:
        child(opts, sizes, a.iters, tiles, blocks)
        return
    if not a.b:
        raise SystemExit("--b is required: the tree holding the other version of the package")
    if a.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {a.rounds}")
    bs = [b for b in a.b.split(",") if b]
    trees = {"A": a.a, **({"B": bs[0]} if len(bs) == 1 else {f"B{k + 1}": b for k, b in enumerate(bs)})}
    for t, root in trees.items():
        if not (Path(root) / "bigbatch" / "__init__.py").is_file():
            raise SystemExit(f"tree {t} ({root}) has no bigbatch/__init__.py")
    res: dict[str, list[dict]] = {t: [] for t in trees}
    order = list(trees)
    for r in range(a.rounds):
        for t in order if r % 2 == 0 else order[::-1]:
            out = run_tree(trees[t], opts, sizes, a.iters, a.tiles, a.blocks)
            res[t].append(out["ms"])
            print(f"round {r} {t} ({out['bigbatch']}): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in out["ms"].items()), flush=True)
    others = order[1:]
    print("\n| size | optimizer | " + " | ".join(f"{t} ms" for t in order) + " | "
          + " | ".join(f"{t} × AdamW" for t in order) + " | " + " | ".join(f"{t} / A" for t in others) + " |")
    print("|---|---|" + "---|" * (3 * len(order) - 1))
    for key in res["A"][0]:
        size, name = key.split("/", 1)
        if name == "adamw":
            continue
        ka = f"{size}/adamw"
        ms = [statistics.median(x[key] for x in res[t]) for t in order]
        rel = [statistics.median(x[key] / x[ka] for x in res[t]) for t in order]
        ba = [statistics.median(xb[key] / xa[key] for xa, xb in zip(res["A"], res[t])) for t in others]
        print(f"| {size} | {name} | " + " | ".join(f"{x:.3f}" for x in ms) + " | "
              + " | ".join(f"{x:.2f}x" for x in rel) + " | " + " | ".join(f"{x:.3f}" for x in ba) + " |")

if __name__ == "__main__":
    main()

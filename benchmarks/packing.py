"""Packing efficiency and speed: BFD and SPFHP against padding, on two length distributions.

1. The running Python's standard library split into functions (every ``def`` not nested in
   another function, its source bytes; functions longer than a row are cut into row-sized
   pieces, as ``bytelm --packing`` does with files).
2. A synthetic long-tailed distribution: 1M lengths ~ lognormal(μ=5, σ=1.2), clipped to [1, L].

Efficiency is the fraction of token slots holding real tokens. "pad to max" pads every
sequence to the row length L; "random batches" pads to the longest of each batch of 32 in
random order; "token budget" is bigbatch.data.token_budget_batches (length-sorted, padding
counted, L·32 tokens per batch). The packers fill rows of L without cross-contamination.

    python benchmarks/packing.py [--n 1000000] [--capacity 2048]
"""

from __future__ import annotations

import argparse
import ast
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np

from bigbatch.data import batch_padding_efficiency, filter_by_length, pack_bfd, pack_spfhp, padding_efficiency, token_budget_batches


def stdlib_function_lengths() -> np.ndarray:
    """Byte lengths of the standard library's functions (outermost ``def``s, methods included)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    out: list[int] = []
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts[:-1]) & skip:
            continue
        src = path.read_bytes()
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        offsets = np.concatenate(([0], np.cumsum([len(x) for x in lines])))
        stack = [tree]
        while stack:
            node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    out.append(int(offsets[child.end_lineno] - offsets[first - 1]))
                else:  # classes, if-blocks: look inside; a function's inner defs stay part of it
                    stack.append(child)
    return np.asarray(out, dtype=np.int64)


def split_long(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Lengths after cutting each sequence into pieces of at most ``capacity``."""
    full = lengths // capacity
    rest = lengths % capacity
    return np.concatenate([np.full(int(full.sum()), capacity, dtype=np.int64), rest[rest > 0]])


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def report(name: str, lengths: np.ndarray, capacity: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    n, total = lengths.size, int(lengths.sum())
    lower = -(-total // capacity)
    rows: list[tuple[str, float, str, float]] = []
    rows.append(("pad to max (L)", padding_efficiency(lengths, capacity), f"{n:,}", 0.0))
    random_batches = np.array_split(rng.permutation(n), max(1, n // 32))
    rows.append(("random batches of 32, pad to batch max", batch_padding_efficiency(lengths, random_batches), f"{n:,}", 0.0))
    tb, t = timed(token_budget_batches, lengths, capacity * 32, seed=seed)
    rows.append((f"token budget {capacity * 32:,} (sorted)", batch_padding_efficiency(lengths, tb), f"{len(tb):,} batches", t))
    for label, fn, kw in (
        ("BFD", pack_bfd, {}),
        ("SPFHP", pack_spfhp, {}),
        ("SPFHP, ≤3 per row (paper's BERT setting)", pack_spfhp, {"max_per_row": 3}),
    ):
        p, t = timed(fn, lengths, capacity, **kw)
        rows.append((label, p.efficiency, f"{p.n_rows:,} (bound {lower:,})", t))
    lines = [
        f"### {name}: {n:,} sequences, L = {capacity}, mean length {lengths.mean():.1f}, median {np.median(lengths):.0f}, max {lengths.max()}",
        "",
        "| method | efficiency (non-pad) | rows | time (s) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {a} | {100 * e:.2f}% | {r} | {t:.3f} |" for a, e, r, t in rows]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic sequences")
    ap.add_argument("--capacity", type=int, default=2048, help="row length for the synthetic set")
    args = ap.parse_args()
    print(f"# packing benchmark ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, numpy {np.__version__})\n")
    funcs = stdlib_function_lengths()
    print(f"stdlib: {funcs.size:,} functions, mean {funcs.mean():.0f} bytes, median {np.median(funcs):.0f}, max {funcs.max():,}\n")
    for L in (512, 2048):
        print(f"filter_by_length instead of cutting: {filter_by_length(funcs, L)}\n")
        print("\n".join(report(f"stdlib functions cut into pieces of at most L={L} bytes", split_long(funcs, L), L)))
    rng = np.random.default_rng(0)
    synth = np.clip(rng.lognormal(5.0, 1.2, args.n).astype(np.int64), 1, args.capacity)
    print("\n".join(report("synthetic lognormal(5, 1.2)", synth, args.capacity)))


if __name__ == "__main__":
    main()

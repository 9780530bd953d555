"""Cost of bigbatch's noise-scale callback inside HF Trainer and Lightning: paired runs of the examples.

Each block runs the example twice, with the callback and without it (``--no-noise``), the order
alternating (ABBA) so that drift of a shared host within a block cancels on average. A run's step
time is what the example measures (wall time over its steps after the first few, divided by their number: its
``StepTimer`` callback); the overhead of a block is with / without − 1, and the table gives the
median over blocks with the B_simple each run with the callback logged, and the spread of the
runs without the callback (the noise floor a 1% effect must stand out of).

By default every run of a framework happens in one process (the example's ``run()`` called again
and again, after one warm-up run that is not counted), so that all runs share the CUDA context,
the cuBLAS handles and the allocator's pool; ``--processes`` starts a fresh process per run
instead (what a user sees, with the run-to-run variation of process start-up included).

    python benchmarks/integrations_overhead.py --pairs 8            # GPU, bf16, the shapes below
    python benchmarks/integrations_overhead.py --pairs 1 --tiny     # CPU smoke run

``--interleave SEG`` (Lightning) measures inside one long run instead: the callback is switched on
and off every SEG optimizer steps (on, off, off, on, ... so that a linear drift cancels), each
segment timed between two synchronisations, and the overhead is taken between neighbouring
segments. Switched off, the callback receives no hook at all, so an "off" segment is the run
without it; drift of a shared host over minutes no longer enters, only over two segments.

    python benchmarks/integrations_overhead.py --frameworks lightning --interleave 20 --steps 1000

GPU shapes: HF Trainer with GPT-2 small (12 × 768, context 1024, 8 sequences per device, 4
accumulation steps, 60 steps, a reading every 10 steps); Lightning with an 8-layer MLP of width
8192 (micro-batch 1024, 4 accumulation steps, 200 steps, a reading every 10 steps).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GPU = {
    "hf": ["examples/hf_trainer.py", "--gpu", "--bf16", "--n-layer", "12", "--n-embd", "768", "--seq", "1024",
           "--per-device-batch", "8", "--accum", "4", "--steps", "60", "--every", "10"],
    "lightning": ["examples/lightning_module.py", "--gpu", "--bf16", "--width", "8192", "--depth", "8",
                  "--micro-batch", "1024", "--accum", "4", "--steps", "200", "--every", "10"],
}
TINY = {
    "hf": ["examples/hf_trainer.py", "--steps", "12", "--every", "2"],
    "lightning": ["examples/lightning_module.py", "--steps", "40", "--every", "2"],
}
STEP = re.compile(r"step time ([0-9.]+) ms")
BSIMPLE = re.compile(r"b_simple \(logged[^)]*\): ([0-9.eE+-]+)")


def run_process(cmd: list[str]) -> tuple[float, float | None]:
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    m = STEP.search(p.stdout)
    if p.returncode != 0 or m is None:
        sys.exit(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    b = BSIMPLE.search(p.stdout)
    return float(m.group(1)), (float(b.group(1)) if b else None)


def load_example(rel: str):
    """The example script ``rel`` (relative to the repository) as a module."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def in_process_runner(cmd: list[str]):
    """A function running the example ``cmd[0]`` with arguments ``cmd[1:]`` (+ extra) in this process."""
    mod = load_example(cmd[0])

    def go(extra: list[str]) -> tuple[float, float | None]:
        r = mod.run(mod.parse_args(cmd[1:] + extra))
        b = r.get("b_simple", (r.get("logged") or {}).get("noise/b_simple"))
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        return r["step_time"] * 1e3, b

    return go


def lightning_interleaved(cmd: list[str], segment: int, steps: int) -> dict:
    """One Lightning run of ``steps`` steps with the noise callback on in every other segment."""
    import lightning.pytorch as pl
    import torch

    from bigbatch.integrations.lightning import NoiseScaleCallback

    mod = load_example(cmd[0])
    a = mod.parse_args(cmd[1:] + ["--steps", str(steps)])

    class Toggle(pl.Callback):
        """Forwards the noise callback's hooks only in "on" segments; times every segment."""

        def __init__(self, inner: NoiseScaleCallback) -> None:
            self.inner, self.step0, self.t0, self.on = inner, None, None, True
            self.times: dict[bool, list[float]] = {True: [], False: []}
            self.sequence: list[tuple[bool, float]] = []
            self.readings: list[float] = []

        def _sync(self) -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def setup(self, trainer, pl_module, stage):
            self.inner.setup(trainer, pl_module, stage)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.on:
                self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_before_backward(self, trainer, pl_module, loss):
            if self.on:
                self.inner.on_before_backward(trainer, pl_module, loss)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.on:
                self.inner.on_before_optimizer_step(trainer, pl_module, optimizer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.on:
                self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            step = trainer.global_step
            if self.t0 is None:
                if step >= 10:  # warm-up done, at a step boundary
                    self.t0, self.step0 = self._sync(), step
                return
            if step - self.step0 == segment:  # a segment ends with this optimizer step
                t = self._sync()
                self.sequence.append((self.on, (t - self.t0) / segment))
                if self.on and "noise/b_simple" in trainer.callback_metrics:
                    self.readings.append(float(trainer.callback_metrics["noise/b_simple"]))
                k = len(self.sequence)  # on, off, off, on, on, off, ...
                self.on = (k % 4) in (0, 3)
                self.t0, self.step0 = t, step

    toggle = Toggle(NoiseScaleCallback(every=a.every))
    model, loader = mod.build(a)
    trainer = mod.trainer_for(a, [toggle], a.accum)
    trainer.fit(model, loader)
    seq = toggle.sequence
    pairs = [(seq[i], seq[i + 1]) for i in range(0, len(seq) - 1, 2)]
    ratios = [(x[1] if x[0] else y[1]) / (y[1] if x[0] else x[1]) - 1 for x, y in pairs if x[0] != y[0]]
    on = [t for o, t in seq if o]
    off = [t for o, t in seq if not o]
    return {"segments": len(seq), "ratios": ratios, "on": on, "off": off, "readings": toggle.readings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--frameworks", default="hf,lightning")
    ap.add_argument("--tiny", action="store_true", help="the examples' CPU defaults (a smoke run)")
    ap.add_argument("--processes", action="store_true", help="a fresh process per run instead of one per framework")
    ap.add_argument("--interleave", type=int, default=0, metavar="SEG",
                    help="Lightning only: switch the callback on and off every SEG steps within one run")
    ap.add_argument("--steps", type=int, default=1000, help="steps of the --interleave run")
    a = ap.parse_args()
    if a.pairs < 1:
        ap.error(f"--pairs must be >= 1 (got {a.pairs})")
    shapes = TINY if a.tiny else GPU
    unknown = sorted(set(a.frameworks.split(",")) - set(shapes))
    if unknown:
        ap.error(f"--frameworks: unknown {', '.join(unknown)} (choose from {', '.join(shapes)})")
    if a.interleave:
        if a.frameworks != "lightning":
            ap.error("--interleave is implemented for --frameworks lightning only")
        if a.interleave < 1 or a.steps < 10 + 4 * a.interleave:
            ap.error(f"--interleave must be >= 1 and --steps >= 10 + 4 * SEG (got {a.interleave}, {a.steps})")
        r = lightning_interleaved(shapes["lightning"], a.interleave, a.steps)
        ov, on, off = r["ratios"], r["on"], r["off"]
        print(f"\nlightning, one run of {a.steps} steps, callback on/off every {a.interleave} steps "
              f"({r['segments']} segments, {len(ov)} neighbouring on/off pairs)\n")
        print("| ms/step on (median) | ms/step off (median) | overhead, median over pairs | mean on / mean off − 1 "
              "| spread of off segments | B_simple logged (last) |")
        print("|---|---|---|---|---|---|")
        spread = (max(off) - min(off)) / statistics.median(off)
        last = f"{r['readings'][-1]:.3g}" if r["readings"] else "none"
        print(f"| {1e3 * statistics.median(on):.2f} | {1e3 * statistics.median(off):.2f} | "
              f"**{100 * statistics.median(ov):+.2f}%** | {100 * (statistics.fmean(on) / statistics.fmean(off) - 1):+.2f}% "
              f"| {100 * spread:.1f}% | {last} |")
        print("overhead per pair:", ", ".join(f"{100 * x:+.1f}%" for x in ov))
        return
    rows = []
    for fw in a.frameworks.split(","):
        base = shapes[fw]
        if a.processes:
            go = lambda extra, base=base: run_process(base + extra)  # noqa: E731
        else:
            go = in_process_runner(base)
            go([])  # warm-up: kernels, handles, the allocator's pool; not counted
        overheads, logged, times = [], [], []
        for i in range(a.pairs):
            order = ("with", "without") if i % 2 == 0 else ("without", "with")
            res = {}
            for kind in order:
                res[kind] = go(["--no-noise"] if kind == "without" else [])
            overheads.append(res["with"][0] / res["without"][0] - 1)
            times.append((res["with"][0], res["without"][0]))
            logged.append(res["with"][1])
            print(f"{fw} block {i}: with {res['with'][0]:.2f} ms, without {res['without'][0]:.2f} ms, "
                  f"overhead {100 * overheads[-1]:+.2f}%, logged b_simple {res['with'][1]}", flush=True)
        rows.append((fw, times, overheads, logged))
    mode = "a process per run" if a.processes else "one process per framework"
    print(f"\n{mode}\n")
    print("| framework | blocks | step ms with / without (per block) | overhead per block | median overhead "
          "| total with / total without − 1 | spread of runs without | logged B_simple |")
    print("|---|---|---|---|---|---|---|---|")
    for fw, times, ov, logged in rows:
        t = ", ".join(f"{w:.1f} / {wo:.1f}" for w, wo in times)
        o = ", ".join(f"{100 * x:+.1f}%" for x in ov)
        b = ", ".join("none" if v is None else f"{v:.3g}" for v in logged)
        wo = [x[1] for x in times]
        total = sum(x[0] for x in times) / sum(wo) - 1
        spread = (max(wo) - min(wo)) / statistics.median(wo)
        print(f"| {fw} | {len(ov)} | {t} | {o} | **{100 * statistics.median(ov):+.2f}%** | {100 * total:+.2f}% "
              f"| {100 * spread:.1f}% | {b} |")


if __name__ == "__main__":
    main()

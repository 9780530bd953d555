"""The sweep: plan the cells, run the unfinished ones (in-process, one process per GPU, or on Ray), report.

Order of events in ``run_study``: resolve the config against the workload (and its study
preset), write ``study.json``, list the cells, skip those with a ``result.json`` (checking they
were run with the same settings), run the rest while a progress display counts cells and
estimates the time left; then, where a batch size's best LR multiplier is at the edge of those
tried, run the next multiplier outward (``lr_extend``, analysis.lr_extensions) until it is
interior; then analyse, plot and write ``results.json`` and ``report.html``. Where the cells
run is an executor's business (executors.py, ray_executor.py); this driver alone decides what
runs and writes results.
On Ctrl-C the running cells are stopped, a partial ``results.json`` is written, and the
interrupt propagates; every file in the directory is then either complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

from bigbatch.study.cells import (
    IGNORED_FOR_RESUME,
    Cell,
    attempt_dir,
    new_attempt,
    read_result,
    target_crossings,
    write_result,
)
from bigbatch.study.config import StudyConfig
from bigbatch.study import executors
from bigbatch.study.executors import CellJob, Executor, make_executor
from bigbatch.study.progress import StudyProgress

__all__ = ["run_study", "resolve_study", "plan_cells", "load_results", "PRESETS", "StudyOutcome", "plan_workers"]

#: Study settings per built-in workload, used where the config leaves a field ``None``. Tuned on
#: 2 CPU cores (docs/study.md): MNIST-1D's CNN reaches 90% test accuracy in ~1 epoch at small
#: batch sizes, its steps-to-target saturate near B≈512, and the whole sweep takes minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "mnist1d": dict(
        batch_sizes=[8, 16, 32, 64, 128, 256, 512, 1024],
        lr=0.025,
        base_batch_size=16,
        rule="sqrt",
        target=0.9,
        budget=32_000 * 16,
        budget_steps=6000,
        eval_every_samples=2000,
        eval_every_steps=5,
    ),
    # A 2-layer GPT (d 128, context 128, bytes of the standard library's .py files; bytelm.py's
    # default shape) on a GPU: three bits-per-byte targets, early to late; an evaluation every 20
    # steps (dense evaluation locates the early crossings to 2%). Batch sizes 4-256: a first H200
    # run over 16-512 put B_crit at ~6, ~9 and 18 for the three targets (the first two below the
    # range), so the range starts at 4; B = 4 reaches the hardest target in ~2,100 steps.
    # cells_per_gpu 4: four cells sharing an H200 gave 1.8x the cells per hour of one (BENCHMARKS.md).
    "bytelm": dict(
        batch_sizes=[4, 8, 16, 32, 64, 128, 256],
        lr=2e-3,
        base_batch_size=64,
        rule="sqrt",
        warmup_samples=1280,
        targets=[3.2, 2.9, 2.6],
        budget=256 * 500,
        budget_steps=3000,
        eval_every_samples=320,
        eval_every_steps=20,
        cells_per_gpu=4,
    ),
}


class StudyOutcome(dict):
    """``results.json`` as a dict (plus ``out``: the run directory)."""


def resolve_study(cfg: StudyConfig, workload: Any) -> dict[str, Any]:
    """Every setting a cell needs, with ``None`` fields filled from the preset or the workload."""
    preset = PRESETS.get(cfg.workload, {})
    d = workload.defaults

    def pick(name: str, fallback: Any) -> Any:
        v = getattr(cfg, name)
        if v is not None:
            return v
        return preset.get(name, fallback)

    base = int(pick("base_batch_size", d.batch_size))
    r: dict[str, Any] = {
        "lr": float(pick("lr", d.lr)),
        "base_batch_size": base,
        "rule": pick("rule", "linear"),
        "batch_sizes": list(pick("batch_sizes", [max(1, base * 2**i // 4) for i in range(8)])),
        "target": pick("target", d.target),
        "budget": int(pick("budget", d.budget_samples)),
        "budget_steps": pick("budget_steps", None),
        "eval_every_steps": int(pick("eval_every_steps", 1)),
        "metric_name": workload.metric_name,
        "higher_is_better": bool(workload.higher_is_better),
        "workload_name": getattr(workload, "name", cfg.workload),
    }
    r["eval_every_samples"] = int(pick("eval_every_samples", max(1, r["budget"] // 200)))
    r["warmup_samples"] = pick("warmup_samples", None)
    r["targets"] = None
    if cfg.targets is None and cfg.target is None and preset.get("targets"):
        cfg = cfg.replace(targets=list(preset["targets"]))  # the preset's target list, unless one was given
    if cfg.targets is not None:
        r["targets"] = _resolve_targets(cfg, r["higher_is_better"])
        r["target"] = r["targets"][-1]  # cells run to the hardest
    if r["target"] is None:
        raise ValueError(f"--target is required: workload {cfg.workload!r} has no default target")
    if not math.isfinite(float(r["target"])):
        raise ValueError(f"target must be a finite number, got {r['target']}")
    r["batch_sizes"] = sorted(set(int(b) for b in r["batch_sizes"]))
    return r


def _resolve_targets(cfg: StudyConfig, higher_is_better: bool) -> list[float]:
    """``cfg.targets`` checked and ordered from the easiest to the hardest."""
    if cfg.target is not None:
        raise ValueError("target and targets were both given (--target, --targets): give one")
    vals = []
    for t in cfg.targets or []:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"targets must be finite numbers, got {t!r}")
        vals.append(float(t))
    if not vals:
        raise ValueError("targets must name at least one target")
    return sorted(set(vals), reverse=not higher_is_better)


def plan_cells(cfg: StudyConfig, resolved: dict[str, Any]) -> list[Cell]:
    """All cells, the rule's own LR (multiplier nearest 1) first across batch sizes, then the others.

    This order fills in a first steps-vs-B curve early (useful when a study is interrupted)
    and keeps the time-left estimate representative of the whole sweep.
    """
    cells = [Cell(b, m, s) for s in cfg.seeds for m in cfg.lr_grid for b in resolved["batch_sizes"]]
    return sorted(cells, key=lambda c: (c.seed, abs(math.log(c.lr_multiplier)), c.lr_multiplier, c.batch_size))


def _train_config(cfg: StudyConfig, r: dict[str, Any], cell: Cell, cell_dir: Path, device: str) -> dict[str, Any]:
    from bigbatch.train import TrainConfig

    tc = TrainConfig(
        workload=cfg.workload,
        workload_args=dict(cfg.workload_args),
        batch_size=cell.batch_size,
        lr=r["lr"] * cell.lr_multiplier,
        base_batch_size=r["base_batch_size"],
        rule=r["rule"],
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        warmup_samples=r.get("warmup_samples"),
        target=float(r["target"]),
        record_targets=list(r["targets"] or []),
        target_resolution=cfg.target_resolution or None,
        stall_fraction=cfg.stall_fraction or None,
        budget_samples=r["budget"],
        max_steps=r["budget_steps"],
        eval_every_samples=max(r["eval_every_samples"], r["eval_every_steps"] * cell.batch_size),
        checkpoint_every_samples=0,  # cells are short: a killed cell restarts, see cells.py
        keep_checkpoints=1,
        seed=cell.seed,
        device=device,
        noise_scale=True,
        out=str(cell_dir),
        overwrite=True,  # a killed cell starts from scratch (cells.py): its partial run is replaced
        progress="none",
    )
    return tc.to_dict()


def _same_settings(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first outcome-relevant field where a finished cell's config differs, else None."""
    for k in sorted(set(old) | set(new)):
        if k in IGNORED_FOR_RESUME:
            continue
        if old.get(k) != new.get(k):
            return f"{k}={old.get(k)!r} (now {new.get(k)!r})"
    return None


def cells_per_gpu(cfg: StudyConfig) -> int:
    """Cells sharing each GPU: the flag, else the workload's preset, else 1."""
    return cfg.cells_per_gpu or int(PRESETS.get(cfg.workload, {}).get("cells_per_gpu", 1))


def plan_workers(cfg: StudyConfig, gpus: list[str], cpu_count: int) -> tuple[int, int | None]:
    """``(jobs, cells_per_gpu)`` for this study: ``executors.plan_workers`` with the workload's preset."""
    return executors.plan_workers(cfg, gpus, cpu_count, cells_per_gpu(cfg))


def run_study(cfg: StudyConfig, *, run_cell_fn: Callable[..., dict[str, Any]] | None = None) -> StudyOutcome:
    """Run (or continue) the study configured by ``cfg`` and write its report; see module doc.

    ``run_cell_fn`` replaces the in-process cell runner when ``jobs == 1`` (tests use it to
    interrupt a study). One study at a time per ``out``: a second one started on the same
    directory while the first runs is refused (``ValueError``), as the two would train the
    same cells.
    """
    cfg = cfg.replace().resolve()
    out = Path(cfg.out)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out} is not a writable directory: {e.strerror or e}") from None
    with study_lock(out):
        return _run_study(cfg, out, run_cell_fn)


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.study.lock`` (an advisory ``flock``) for the duration; ``ValueError`` if another holds it.

    The kernel releases the lock when its holder dies however it dies, so a killed study never
    blocks the next one; the descriptor is not inherited by worker processes. Where ``fcntl``
    does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = out / ".study.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ValueError(f"another bigbatch study (pid {holder}) is running in --out {out}; "
                             f"wait for it to finish or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_study(cfg: StudyConfig, out: Path, run_cell_fn: Callable[..., dict[str, Any]] | None) -> StudyOutcome:
    """``run_study`` once ``out`` exists and is locked."""
    from bigbatch.study.analysis import analyze, lr_extensions
    from bigbatch.study.report import write_outputs
    from bigbatch.train.checkpoint import write_json_atomic
    from bigbatch.workloads import load_workload

    workload = load_workload(cfg.workload, **cfg.workload_args)
    resolved = resolve_study(cfg, workload)
    t0, ran = time.perf_counter(), [0]
    write_json_atomic({"config": cfg.to_dict(), "resolved": resolved}, out / "study.json")
    cells = plan_cells(cfg, resolved)
    records: dict[str, dict[str, Any]] = {}
    executor, cell_device, jobs, per_gpu = make_executor(cfg, out, workload, run_cell_fn, cells_per_gpu=cells_per_gpu(cfg))

    def with_targets(record: dict[str, Any]) -> dict[str, Any]:
        """The record with ``by_target``: when its run first reached each target (from metrics.jsonl).

        Computed here rather than kept from an earlier invocation, so a finished cell serves a
        study whose easier targets changed (its run stopped at the same hardest target).
        """
        if resolved["targets"]:
            from bigbatch.train.metrics import read_metrics

            path = Path(record["train"]["out"]) / "metrics.jsonl"
            metrics = read_metrics(path)
            if not any(m.get("kind") == "eval" for m in metrics):
                # Without its evaluations a finished cell would count as reaching no target at all.
                raise ValueError(f"cell {record['name']}: {path} holds no evaluations, needed for --targets; "
                                 f"delete {Path(record['train']['out']).parent / 'result.json'} to run the cell again")
            record = {**record, "by_target": target_crossings(
                metrics, resolved["targets"], resolved["metric_name"], resolved["higher_is_better"])}
        return record

    def prepare(new_cells: list[Cell]) -> list[CellJob]:
        """The cells among ``new_cells`` still to run (with the attempt token each starts under);
        finished ones go straight into ``records``."""
        pending: list[CellJob] = []
        for cell in new_cells:
            cell_dir = out / "cells" / cell.name
            attempt = new_attempt()
            spec = {
                "cell": {"batch_size": cell.batch_size, "lr_multiplier": cell.lr_multiplier, "seed": cell.seed},
                "attempt": attempt,
                "train": _train_config(cfg, resolved, cell, attempt_dir(cell_dir, attempt), cell_device),
            }
            done = read_result(cell_dir)
            if done is not None:
                diff = _same_settings(done.get("train", {}), spec["train"])
                if diff is not None:
                    raise ValueError(
                        f"{cell_dir} was run with different settings: {diff}; use another --out to study new settings"
                    )
                records[cell.name] = with_targets(done)
                continue
            cell_dir.mkdir(parents=True, exist_ok=True)
            # Earlier attempts were killed before they finished: their files are of no use, and the
            # new attempt trains in its own directory whatever is left of them.
            for old in cell_dir.glob("run-*"):
                shutil.rmtree(old, ignore_errors=True)
            write_json_atomic(spec, cell_dir / "cell.json")
            pending.append(CellJob(cell, cell_dir, attempt))
        return pending

    grid = list(cells)  # the planned cells; extensions are listed after them, sorted (see ordered())
    # "+" on the progress count: LR-grid extensions may still add cells (analysis.lr_extensions).
    may_extend = cfg.lr_extend > 0 and len(cfg.lr_grid) > 1
    queue: deque[CellJob] = deque()
    running: dict[str, CellJob] = {}
    progress: StudyProgress | None = None

    def ordered() -> list[dict[str, Any]]:
        """The finished records in a fixed order, whatever order they finished in."""
        extra = sorted(set(cells[len(grid):]))
        return [records[c.name] for c in [*grid, *extra] if c.name in records]

    def finished(job: CellJob, record: dict[str, Any]) -> None:
        """A cell this invocation ran: check it is this attempt's, write result.json, count it."""
        record = with_targets(record)
        write_result(job.cell_dir, record, job.attempt)
        ran[0] += 1
        records[record["name"]] = record
        progress.cell_done(record, resolved["metric_name"])

    def extend(batch_size: int) -> None:
        """Queue the LR-grid extension at ``batch_size`` once none of its cells is left to run.

        The next multiplier at a batch size depends only on that batch size's finished records
        (analysis.lr_extensions), so it is scheduled as soon as they are in, at the front of the
        queue (each extension may need another after it), and a resumed study finds the same
        extension cells (already finished: reused) and ends with the same result.
        """
        while may_extend:
            if any(j.cell.batch_size == batch_size for j in [*queue, *running.values()]):
                return
            mine = [records[c.name] for c in cells if c.batch_size == batch_size and c.name in records]
            new_cells = sorted(Cell(b, m, s) for b, m in lr_extensions(mine, cfg.lr_grid, cfg.lr_extend)
                               for s in cfg.seeds)
            if not new_cells:
                return
            cells.extend(new_cells)
            n_before = len(records)
            pending = prepare(new_cells)
            progress.add_cells(len(new_cells), done=len(records) - n_before)
            queue.extendleft(reversed(pending))

    def report(complete: bool) -> StudyOutcome:
        results = analyze(ordered(), cfg, resolved, total_cells=len(cells), bootstrap_seed=0)
        results["complete"] = complete
        wall = time.perf_counter() - t0
        # Cells trained by this invocation per wall-clock hour: what --cells-per-gpu is measured by.
        results["timing"] = {"wall_seconds": wall, "cells": ran[0], "cells_per_hour": ran[0] * 3600 / wall if wall > 0 else None,
                             "workers": jobs, "cells_per_gpu": per_gpu, "device": cell_device,
                             "executor": cfg.executor}
        write_outputs(results, out)
        return StudyOutcome(results, out=str(out))

    clean = False
    try:
        queue.extend(prepare(cells))
        progress = StudyProgress(cfg.progress, total=len(cells), done=len(records), jobs=jobs,
                                 title=resolved["workload_name"], open_ended=may_extend)
        executor.on_note = progress.note
        for b in resolved["batch_sizes"]:  # a resumed study: batch sizes whose cells all finished earlier
            extend(b)
        while queue or running:
            while queue and len(running) < max(1, executor.capacity()):
                job = queue.popleft()
                progress.cell_started(job.cell)
                executor.submit(job)
                running[job.cell.name] = job
            job, record = executor.next_finished()
            del running[job.cell.name]
            finished(job, record)
            extend(job.cell.batch_size)
        clean = True
    except BaseException:  # Ctrl-C or a failed cell: keep what finished readable, then re-raise
        if progress is not None:
            progress.close()
        executor.close(clean=False)
        if records:
            try:
                report(complete=False)
            except Exception:  # never mask the original error
                pass
        raise
    finally:
        if progress is not None:
            progress.close()
        if clean:
            executor.close(clean=True)
    return report(complete=len(records) == len(cells))


def load_results(out: str | Path) -> dict[str, Any]:
    """``results.json`` of a finished study directory."""
    p = Path(out) / "results.json"
    if not p.exists():
        raise FileNotFoundError(f"no results.json in {out}")
    return json.loads(p.read_text())

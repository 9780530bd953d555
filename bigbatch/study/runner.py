"""The sweep: plan the cells, run the unfinished ones (in-process or one process per GPU), report.

Order of events in ``run_study``: resolve the config against the workload (and its study
preset), write ``study.json``, list the cells, skip those with a ``result.json`` (checking they
were run with the same settings), run the rest while a progress display counts cells and
estimates the time left; then, where a batch size's best LR multiplier is at the edge of those
tried, run the next multiplier outward (``lr_extend``, analysis.lr_extensions) until it is
interior; then analyse, plot and write ``results.json`` and ``report.html``.
On Ctrl-C the running cells are stopped, a partial ``results.json`` is written, and the
interrupt propagates; every file in the directory is then either complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bigbatch.study.cells import (
    IGNORED_FOR_RESUME,
    Cell,
    attempt_dir,
    new_attempt,
    read_result,
    run_cell,
    target_crossings,
    write_result,
)
from bigbatch.study.config import StudyConfig
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
    # cells_per_gpu 4: four cells share the GPU at 3.3x or more the cells per hour of one
    # (benchmarks/study_gpu.py, BENCHMARKS.md).
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


def _visible_gpus(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    if device.startswith("cuda:"):
        return [device.split(":", 1)[1]]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else []
    n = torch.cuda.device_count()
    return ids[:n] if ids else [str(i) for i in range(n)]


def plan_workers(cfg: StudyConfig, gpus: list[str], cpu_count: int) -> tuple[int, int | None]:
    """``(jobs, cells_per_gpu)``: how many worker processes run cells at once, and how many share a GPU.

    With GPUs: ``jobs`` if given (spread over the GPUs in turn), else ``cells_per_gpu`` per GPU
    (the flag, else the workload's preset, else 1). On a CPU ``cells_per_gpu`` has no meaning
    and is refused; the default there is one single-threaded worker per core, at most 8, which
    beats one multi-threaded process for the small models a CPU study can afford.
    """
    if not gpus:
        if cfg.cells_per_gpu is not None:
            raise ValueError("cells_per_gpu (--cells-per-gpu) applies to --device cuda; this study runs on the CPU, "
                             "where --jobs sets the cells run at once")
        return cfg.jobs or min(8, cpu_count), None
    if cfg.jobs:
        return cfg.jobs, None
    per_gpu = cfg.cells_per_gpu or int(PRESETS.get(cfg.workload, {}).get("cells_per_gpu", 1))
    return len(gpus) * per_gpu, per_gpu


def _worker_env(slot: int, gpus: list[str], threads: int) -> dict[str, str]:
    """The environment of worker ``slot``: its GPU (slots take the GPUs in turn) and its CPU threads."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    env["OMP_NUM_THREADS"] = env["BIGBATCH_THREADS"] = str(threads)
    return env


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    device = _resolve_device(cfg.device)
    gpus = _visible_gpus(device)
    jobs, cells_per_gpu = plan_workers(cfg, gpus, os.cpu_count() or 1)
    t0, ran = time.perf_counter(), [0]
    write_json_atomic({"config": cfg.to_dict(), "resolved": resolved}, out / "study.json")

    cells = plan_cells(cfg, resolved)
    records: dict[str, dict[str, Any]] = {}
    cell_device = "cuda" if gpus and jobs > 1 else device

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

    def prepare(new_cells: list[Cell]) -> list[tuple[Cell, Path, str]]:
        """The cells among ``new_cells`` still to run (with the attempt token each starts under);
        finished ones go straight into ``records``."""
        pending: list[tuple[Cell, Path, str]] = []
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
            pending.append((cell, cell_dir, attempt))
        return pending

    pending = prepare(cells)
    # "+" on the progress count: LR-grid extensions may still add cells (analysis.lr_extensions).
    may_extend = cfg.lr_extend > 0 and len(cfg.lr_grid) > 1
    progress = StudyProgress(cfg.progress, total=len(cells), done=len(records), jobs=jobs,
                             title=resolved["workload_name"], open_ended=may_extend)

    def finished(cell_dir: Path, record: dict[str, Any], attempt: str) -> None:
        """A cell this invocation ran: check it is this attempt's, write result.json, count it."""
        record = with_targets(record)
        write_result(cell_dir, record, attempt)
        ran[0] += 1
        records[record["name"]] = record
        progress.cell_done(record, resolved["metric_name"])

    def report(complete: bool) -> StudyOutcome:
        ordered = [records[c.name] for c in cells if c.name in records]
        results = analyze(ordered, cfg, resolved, total_cells=len(cells), bootstrap_seed=0)
        results["complete"] = complete
        wall = time.perf_counter() - t0
        # Cells trained by this invocation per wall-clock hour: what --cells-per-gpu is measured by.
        results["timing"] = {"wall_seconds": wall, "cells": ran[0], "cells_per_hour": ran[0] * 3600 / wall if wall > 0 else None,
                             "workers": jobs, "cells_per_gpu": cells_per_gpu, "device": device}
        write_outputs(results, out)
        return StudyOutcome(results, out=str(out))

    def run(pending: list[tuple[Cell, Path, str]]) -> None:
        if jobs > 1:
            _run_parallel(pending, jobs, gpus, out, progress, finished)
        else:
            runner = run_cell_fn or run_cell
            for cell, cell_dir, attempt in pending:
                progress.cell_started(cell)
                finished(cell_dir, runner(cell_dir, workload), attempt)

    try:
        run(pending)
        # Extend the LR grid where the best multiplier is at its edge, round by round. The next
        # cells are a function of the finished records only, so a resumed study finds the same
        # extension cells (already finished: reused) and ends with the same result.
        while may_extend:
            ordered = [records[c.name] for c in cells if c.name in records]
            new_cells = sorted(Cell(b, m, s) for b, m in lr_extensions(ordered, cfg.lr_grid, cfg.lr_extend)
                               for s in cfg.seeds)
            if not new_cells:
                break
            cells.extend(new_cells)
            n_before = len(records)
            pending = prepare(new_cells)
            progress.add_cells(len(new_cells), done=len(records) - n_before)
            run(pending)
    except BaseException:  # Ctrl-C or a failed cell: keep what finished readable, then re-raise
        progress.close()
        if records:
            try:
                report(complete=False)
            except Exception:  # never mask the original error
                pass
        raise
    finally:
        progress.close()
    return report(complete=len(records) == len(cells))


def _run_parallel(
    pending: list[tuple[Cell, Path, str]],
    jobs: int,
    gpus: list[str],
    out: Path,
    progress: StudyProgress,
    finished: Callable[[Path, dict[str, Any], str], None],
) -> None:
    """``jobs`` worker processes (worker.py), each fed one cell at a time.

    On GPUs each worker sees one device through ``CUDA_VISIBLE_DEVICES`` (``cells_per_gpu``
    workers share each); the CPU cores are shared out among the workers (small models run best
    on one thread each, several cells side by side).
    Workers die with this process, however it ends (worker.py: a parent-death signal on Linux,
    and everywhere a pipe whose write end only this process holds: its end of file, when this
    process is gone, stops the worker). The records they answer are written here, and only for
    the attempt this study started (cells.write_result).
    """
    import queue as queue_mod
    import threading

    todo = list(pending)
    answers: queue_mod.Queue = queue_mod.Queue()
    workers: list[tuple[subprocess.Popen, Any]] = []
    busy: dict[int, tuple[Cell, Path, str]] = {}
    lifelines: list[int] = []  # write ends of the pipes the workers watch; closed once they have exited
    threads = max(1, (os.cpu_count() or 1) // jobs)
    n = min(jobs, len(todo))
    clean = False

    def reader(slot: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # one JSON answer per cell; EOF when the worker exits
            answers.put((slot, json.loads(line)))
        answers.put((slot, None))

    def send(slot: int) -> None:
        cell, cell_dir, attempt = todo.pop(0)
        busy[slot] = (cell, cell_dir, attempt)
        progress.cell_started(cell)
        workers[slot][0].stdin.write(f"{cell_dir}\n")
        workers[slot][0].stdin.flush()

    try:
        for slot in range(n):
            env = _worker_env(slot, gpus, threads)
            log = open(out / f"worker{slot}.log", "a")
            # os.pipe() is not inherited: the write end stays here alone, the read end goes to
            # this worker only (pass_fds), so no other child keeps it open after we die.
            watch_r, watch_w = os.pipe()
            lifelines.append(watch_w)
            env["BIGBATCH_PARENT_PID"] = str(os.getpid())
            env["BIGBATCH_PARENT_FD"] = str(watch_r)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bigbatch.study.worker"],
                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                    pass_fds=(watch_r,),
                )
            finally:
                os.close(watch_r)
            workers.append((proc, log))
            threading.Thread(target=reader, args=(slot, proc), daemon=True).start()
            send(slot)
        while busy:
            try:
                slot, answer = answers.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
            except queue_mod.Empty:
                continue
            cell, cell_dir, attempt = busy.pop(slot)
            if answer is None:
                raise RuntimeError(f"study worker {slot} exited while running {cell.name}; see {out / f'worker{slot}.log'}")
            record = answer.get("record") if answer["ok"] else None
            if record is None:
                raise ValueError(f"cell {cell.name} failed: {answer.get('error', 'no result')}; log: {out / f'worker{slot}.log'}")
            finished(cell_dir, record, attempt)
            if todo:
                send(slot)
        clean = True
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                if clean:
                    proc.stdin.close()  # the worker exits at end of input
                else:  # interrupted or failed: stop the running cells now
                    proc.terminate()
        for proc, log in workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        for fd in lifelines:
            os.close(fd)


def load_results(out: str | Path) -> dict[str, Any]:
    """``results.json`` of a finished study directory."""
    p = Path(out) / "results.json"
    if not p.exists():
        raise FileNotFoundError(f"no results.json in {out}")
    return json.loads(p.read_text())

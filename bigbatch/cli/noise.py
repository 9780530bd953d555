"""``bigbatch noise RUN_DIR``: B_simple over a training run, as a table, a summary and a PNG.

Reads the run's ``metrics.jsonl`` (written by ``bigbatch train --noise-scale``): train records
with ``b_simple``, ``grad_sqnorm``, ``trace_sigma``, ``batch_size``, ``samples`` (and, for
token-normalised losses, ``b_simple_samples``, B_simple in examples). McCandlish et al. 2018:
B_simple ≈ the critical batch size; a batch far below it wastes steps, far above it wastes
compute.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from bigbatch._files import check_output_file, writing

__all__ = ["register", "noise_command", "load_noise_records", "summarize", "plot_noise"]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def load_noise_records(run_dir: Path) -> list[dict[str, Any]]:
    """Train records of ``run_dir/metrics.jsonl`` that carry a noise-scale reading."""
    from bigbatch.train.metrics import read_metrics

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory does not exist: {run_dir}")
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    recs = [r for r in read_metrics(path) if r.get("kind", "train") == "train" and "b_simple" in r and "samples" in r]
    if not recs:
        raise ValueError(f"{path} has no noise-scale records (b_simple); train with --noise-scale")
    return recs


def summarize(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and late-run values; B_simple in the batch-size unit (examples) when available."""
    in_samples = any(r.get("b_simple_samples") is not None for r in recs)
    key = "b_simple_samples" if in_samples else "b_simple"
    finite = [(r, _num(r.get(key))) for r in recs if math.isfinite(_num(r.get(key)))]
    last = recs[-1]
    out: dict[str, Any] = {"records": len(recs), "samples": last.get("samples"), "batch_size": last.get("batch_size"),
                           "unit": "examples" if in_samples else "loss units",
                           "b_simple": None, "b_simple_late_median": None, "batch_over_b_simple": None}
    if finite:
        b_last = finite[-1][1]
        late = sorted(v for _, v in finite[-max(1, len(finite) // 5):])
        out["b_simple"] = b_last
        out["b_simple_late_median"] = late[len(late) // 2]
        out["b_simple_first"] = finite[0][1]
        if isinstance(last.get("batch_size"), (int, float)) and b_last > 0:
            out["batch_over_b_simple"] = last["batch_size"] / b_last
    out["key"] = key
    return out


def plot_noise(recs: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """B_simple (with the batch size as a step line), |G|² and tr Σ, and the loss vs samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "b_simple_samples" if any(r.get("b_simple_samples") is not None for r in recs) else "b_simple"
    s = [_num(r["samples"]) for r in recs]
    has_loss = any(math.isfinite(_num(r.get("loss"))) for r in recs)
    fig, axes = plt.subplots(3 if has_loss else 2, 1, figsize=(7.5, 8.5 if has_loss else 6), sharex=True)
    ax = axes[0]
    b = [_num(r.get(key)) for r in recs]
    pos = [(x, y) for x, y in zip(s, b) if y > 0]
    if pos:
        ax.plot(*zip(*pos), color="C0", label="B_simple" + (" (examples)" if key == "b_simple_samples" else ""))
    bs = [_num(r.get("batch_size")) for r in recs]
    if any(math.isfinite(v) for v in bs):
        ax.step(s, bs, where="post", color="C3", linestyle="--", label="batch size")
    ax.set_yscale("log")
    ax.set_ylabel("batch size / B_simple")
    ax.legend(loc="best")
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    for k, label, color in (("grad_sqnorm", "|G|²", "C1"), ("trace_sigma", "tr Σ", "C2")):
        v = [_num(r.get(k)) for r in recs]
        ax.plot(s, v, color=color, label=label)
    vals = [_num(r.get(k)) for r in recs for k in ("grad_sqnorm", "trace_sigma")]
    if vals and all(v > 0 for v in vals if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_ylabel("EMA estimate (per loss unit)")
    ax.legend(loc="best")
    ax.grid(True, which="both", alpha=0.3)
    if has_loss:
        axes[2].plot(s, [_num(r.get("loss")) for r in recs], color="C4")
        axes[2].set_ylabel("training loss")
        axes[2].grid(True, alpha=0.3)
    axes[-1].set_xlabel("samples")
    fig.suptitle(title or "gradient noise scale (McCandlish et al. 2018)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    x = _num(v)
    return "-" if not math.isfinite(x) else f"{x:.4g}"


def noise_command(
    run_dir: Path = typer.Argument(..., help="Output directory of a training run (holds metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, help="PNG path (default: RUN_DIR/noise.png)."),
    rows: int = typer.Option(10, help="Rows of the table (evenly spaced over the run)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the PNG."),
) -> None:
    """Plot and summarise the gradient noise scale B_simple logged by a training run."""
    if rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    recs = load_noise_records(run_dir)
    png = out or run_dir / "noise.png"
    if plot:  # before the table, so that an unwritable path is the only thing printed
        check_output_file(png, "--out")
    summ = summarize(recs)
    key = summ["key"]
    picks = sorted({round(i * (len(recs) - 1) / max(1, rows - 1)) for i in range(min(rows, len(recs)))})
    header = f"{'samples':>12} {'batch':>7} {'B_simple':>11} {'|G|^2':>11} {'tr Sigma':>11} {'loss':>9}"
    typer.echo(header)
    for i in picks:
        r = recs[i]
        typer.echo(f"{_fmt(r.get('samples')):>12} {_fmt(r.get('batch_size')):>7} {_fmt(r.get(key)):>11} "
                   f"{_fmt(r.get('grad_sqnorm')):>11} {_fmt(r.get('trace_sigma')):>11} {_fmt(r.get('loss')):>9}")
    unit = "examples" if key == "b_simple_samples" else "loss units"
    if summ["b_simple"] is None:
        typer.echo(f"B_simple: no positive estimate yet ({summ['records']} records)")
    else:
        ratio = summ["batch_over_b_simple"]
        typer.echo(f"B_simple ({unit}): final {summ['b_simple']:.4g}, median of the last fifth "
                   f"{summ['b_simple_late_median']:.4g}, first {summ['b_simple_first']:.4g}")
        if ratio is not None:
            verdict = "below" if ratio < 0.5 else "above" if ratio > 2 else "near"
            typer.echo(f"batch size {summ['batch_size']} is {ratio:.2g}x B_simple: {verdict} the critical batch size")
    if plot:
        with writing("--out", png):
            path = plot_noise(recs, png, title=f"{run_dir.name}: gradient noise scale")
        typer.echo(f"plot: {path}")


def register(app: typer.Typer) -> None:
    app.command("noise")(noise_command)

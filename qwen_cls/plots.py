"""Training curves as PNGs beside the checkpoints (``output_dir/plots/``), drawn from the local metrics log.

Matplotlib's object API on the Agg canvas (no display, no pyplot state). This module imports neither
torch nor Lightning, so during training :class:`qwen_cls.monitor.RunPlots` runs it as a light script in
a low-priority process. Each PNG carries the number of points of each line in its metadata, so what was
drawn can be checked against the log.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qwen_cls.step_axis import STEP

PLOTS_DIR = "plots"
LOG_GLOB = "logs/version_*/metrics.csv"


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Every logged row of a run, one per optimizer step, across its starts and resumes (``version_N`` in
    order; a resumed part replaces what an earlier part logged for the same steps)."""
    logs = sorted(Path(run_dir).glob(LOG_GLOB), key=lambda p: int(p.parent.name.split("_")[1]))
    by_step: dict[int, dict[str, float]] = {}
    for log in logs:
        with log.open() as fh:
            for row in csv.DictReader(fh):
                if not row.get(STEP):
                    continue
                step = int(float(row[STEP]))
                values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != STEP}
                by_step.setdefault(step, {}).update(values)
    return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def series(rows: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _save(fig: Figure, path: Path, points: dict[str, int]) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Description": json.dumps({"points": points})})
    tmp.replace(path)  # a reader never sees half a PNG


def _figure(title: str, ylabel: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_run(run_dir: str | Path, run_name: str | None = None) -> dict[str, dict[str, int]]:
    """Draw ``loss.png``, ``lr.png``, ``grad_norm.png`` and ``throughput.png`` into ``run_dir/plots``;
    return, per file, the number of points of each line (what the PNG's metadata says too)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    name = run_name or run_dir.resolve().name
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    drawn: dict[str, dict[str, int]] = {}

    steps, loss = series(rows, "train/loss")
    log_scale = bool(loss) and min(loss) > 0 and max(loss) / min(loss) > 5  # log only where it spreads
    fig, ax = _figure(f"{name}: training loss", "loss (log scale)" if log_scale else "loss")
    points = {"train/loss": len(loss)}
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="train/loss")
    ax.plot(steps, smooth(loss), color="tab:blue", lw=2, label="train/loss, smoothed (EMA 0.9)")
    per_dataset = sorted({k for r in rows for k in r if k.startswith("train/") and k.endswith("_loss")})
    if len(per_dataset) > 1:  # with one dataset its line is the overall one
        for key in per_dataset:
            s, v = series(rows, key)
            ax.plot(s, smooth(v), lw=1.2, ls="--", label=f"{key} (smoothed)")
            points[key] = len(v)
    if log_scale:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    _save(fig, out / "loss.png", points)
    drawn["loss.png"] = points

    for file, key, label in (
        ("lr.png", "train/lr", "learning rate"),
        ("grad_norm.png", "train/grad_norm", "gradient norm (before clipping)"),
    ):
        fig, ax = _figure(f"{name}: {label}", label)
        steps, values = series(rows, key)
        ax.plot(steps, values, color="tab:green", lw=1.5, marker="." if len(values) < 50 else None)
        _save(fig, out / file, {key: len(values)})
        drawn[file] = {key: len(values)}

    util_key = "perf/mfu" if any("perf/mfu" in r for r in rows) else "perf/tflops"
    fig = Figure(figsize=(6.4, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set_title(f"{name}: throughput (all ranks; windows between logging steps)", fontsize=10)
    points = {}
    for ax, key, label, scale, color in (
        (top, "perf/samples_per_second", "samples/s", 1, "tab:orange"),
        (bottom, util_key, "MFU (%)" if util_key == "perf/mfu" else "model TFLOP/s per device",
         100 if util_key == "perf/mfu" else 1, "tab:purple"),
    ):  # fmt: skip
        steps, values = series(rows, key)
        ax.plot(
            steps, [v * scale for v in values], color=color, lw=1.5, marker="." if len(values) < 50 else None
        )
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        points[key] = len(values)
    bottom.set_xlabel("optimizer step")
    _save(fig, out / "throughput.png", points)
    drawn["throughput.png"] = points
    return drawn


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw a run's training curves into RUN_DIR/plots.")
    parser.add_argument("run_dir")
    parser.add_argument("--run_name")
    args = parser.parse_args()
    plot_run(args.run_dir, args.run_name)

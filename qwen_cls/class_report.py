"""Per-class results of an evaluation, as files a person reads: a per-class CSV (precision, recall, F1, support,
per dataset, with the config's class names), each dataset's confusion matrix as a CSV and a PNG, and the weakest
classes. The numbers come from :class:`qwen_cls.metrics.ClassificationMetrics`; ``report`` reads the CSV back.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_cls.config import DatasetsConfig

if TYPE_CHECKING:  # no torch at import: `qwen-cls report` reads the CSV alone
    from qwen_cls.metrics import ClassScores

CLASS_COLUMNS = ("dataset", "class", "name", "precision", "recall", "f1", "support", "predicted")
# Up to this many classes the PNG shows the whole matrix with its names; beyond, the most confused pairs.
READABLE_CLASSES = 30
WORST_PAIRS = 25


def class_rows(classes: dict[str, ClassScores], datasets: DatasetsConfig) -> list[dict[str, Any]]:
    """One row per (dataset, class) that occurred, named from the config."""
    rows = []
    for dataset, scores in classes.items():
        names = datasets.names(dataset) if dataset in datasets.dataset_configs else None
        rows += [{"dataset": dataset, **row} for row in scores.rows(names)]
    return rows


def weakest(rows: list[dict[str, Any]], count: int = 5) -> list[dict[str, Any]]:
    """The classes with samples and the lowest F1 (then recall), worst first."""
    present = [r for r in rows if int(r["support"]) > 0]
    return sorted(present, key=lambda r: (float(r["f1"]), float(r["recall"])))[:count]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Written whole, then renamed: a kill leaves the previous file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_confusion(stem: Path, dataset: str, scores: ClassScores, names: list[str] | None) -> list[Path]:
    """``<stem>.confusion.<dataset>.csv`` (rows: label, columns: prediction, over the classes that occurred) and
    its ``.png``; nothing when the head has too many columns to keep the matrix."""
    if scores.confusion is None:
        return []
    keep = scores.classes
    labels = [names[c] if names and c < len(names) else str(c) for c in keep]
    matrix = scores.confusion[keep][:, keep]
    csv_path = stem.with_name(f"{stem.name}.confusion.{dataset}.csv")
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label \\ predicted", *labels])
        for label, row in zip(labels, matrix.tolist(), strict=True):
            writer.writerow([label, *row])
    os.replace(tmp, csv_path)
    png = csv_path.with_suffix(".png")
    _plot_confusion(png, f"{dataset}: confusion matrix", matrix, labels)
    return [csv_path, png]


def worst_pairs(matrix, labels: list[str], count: int = WORST_PAIRS) -> list[tuple[str, str, int, float]]:
    """The most frequent mistakes: (label, predicted, samples, share of the label's samples), most first."""
    totals = matrix.sum(1)
    pairs = [
        (labels[i], labels[j], int(matrix[i, j]), float(matrix[i, j]) / max(int(totals[i]), 1))
        for i in range(len(labels))
        for j in range(len(labels))
        if i != j and matrix[i, j] > 0
    ]
    return sorted(pairs, key=lambda p: (-p[2], -p[3]))[:count]


def _plot_confusion(path: Path, title: str, matrix, labels: list[str]) -> None:
    """The whole matrix with names while it is readable (up to :data:`READABLE_CLASSES`); beyond, the
    row-normalised matrix as a picture beside a bar chart of the most confused pairs, by name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    share = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    n = len(labels)
    if n <= READABLE_CLASSES:
        side = max(4.0, 0.45 * n + 2)
        fig = Figure(figsize=(side + 1.5, side), constrained_layout=True)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
        ax.set(xlabel="predicted", ylabel="label", title=title)
        fig.colorbar(image, ax=ax, label="share of the label's samples")
    else:
        pairs = worst_pairs(matrix, labels)
        fig = Figure(figsize=(16, max(6.0, 0.32 * len(pairs) + 2)), constrained_layout=True)
        FigureCanvasAgg(fig)
        full, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        full.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
        full.set(xlabel="predicted (class order)", ylabel="label", title=f"{title} ({n} classes, row shares)")
        names = [f"{a} → {b}" for a, b, _, _ in pairs][::-1]
        bars.barh(range(len(pairs)), [p[2] for p in pairs][::-1], color="tab:red")
        bars.set_yticks(range(len(pairs)), names, fontsize=8)
        for y, (_, _, count, part) in enumerate(pairs[::-1]):
            bars.text(count, y, f" {count} ({part:.0%})", va="center", fontsize=7)
        bars.set(xlabel="samples", title=f"the {len(pairs)} most confused pairs (label → predicted)")
    fig.savefig(path, dpi=110)

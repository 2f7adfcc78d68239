"""The one x-axis of every metric qwen-cls logs: the optimizer step a value belongs to, the number in the
checkpoint folders' names.

Lightning's loggers take a logged metric named ``step`` as a row's step (the CSV's ``step`` column); without it
they write the global step minus one. W&B plots against ``trainer/global_step``, which Lightning's WandbLogger
writes with every row and ``evaluate-all`` writes with its results, so a checkpoint scored later lands on
the same axis as the training run's own curves. Every reader and writer of that axis goes through here.
"""

from __future__ import annotations

from typing import Any

STEP = "step"  # the metric Lightning's loggers take as a row's step; the CSV column the plots read
WANDB_STEP = "trainer/global_step"
PREFIXES = ("train", "perf", "system", "eval")  # the metric families plotted against it


def step_metric(step: int) -> dict[str, float]:
    """What the module logs beside a step's metrics (a float: Lightning logs metrics as numbers)."""
    return {STEP: float(step)}


def define_wandb_axis(run: Any) -> None:
    """A W&B run's panels plotted against the optimizer step."""
    run.define_metric(WANDB_STEP)
    for prefix in PREFIXES:
        run.define_metric(f"{prefix}/*", step_metric=WANDB_STEP)


def wandb_row(step: int, metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """Metrics logged to W&B outside Lightning (``evaluate-all``), on the same axis."""
    return {WANDB_STEP: step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}

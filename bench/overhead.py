"""Side-by-side timings on one machine, in one run (`make bench`). Prints ratios; asserts nothing.

1. framework overhead: `qwen-cls fit` (no-evaluation mode) vs a bare PyTorch loop, training steps/s in the
   loop and whole processes (`qwen-cls fit` vs `bench/bare_loop.py`, start-up included), median of
   alternating repeated pairs; ms-swift's `seq_cls` on the same work when it is installed (skipped otherwise);
2. skip-evaluation speed-up: no-evaluation vs standard mode (full validation every `save_steps`),
   same steps and checkpoints, wall time of the fit;
3. cost of keeping every checkpoint: training steps/s saving every `save_steps` vs saving nothing until
   the end (the final save falls outside the timed steps);
4. data path: images/s out of the training DataLoader (one process, and with the run's workers) vs the
   images/s training consumes;
5. cost of redrawing the plots at each checkpoint: steps/s with ``monitor.plots`` on vs off;
6. what the run's own monitor logged (``perf/*`` in its metrics.csv) next to this script's timing.

Uses the tiny Qwen2.5-VL and the MNIST demo data (built under outputs/ if missing).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch
import yaml
from bare_loop import bare_loop
from data_path import data_path
from inputs import demo_inputs
from lightning.pytorch import Callback
from report import report

from qwen_cls.cli import QwenCLI
from qwen_cls.data import QwenDataModule, auto_num_workers
from qwen_cls.model import QwenClassifier


class StepTimer(Callback):
    """Training-step rate between the end of step 1 and the last step (excludes start-up)."""

    def __init__(self):
        self.first = self.last = None
        self.steps = 0
        self.fit_seconds = 0.0

    def on_fit_start(self, trainer, pl_module):
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.fit_seconds = time.perf_counter() - self._fit_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.steps += 1
        if self.steps == 1:
            self.first = now
        self.last = now

    @property
    def steps_per_second(self) -> float:
        return (self.steps - 1) / (self.last - self.first)


def run_fit(config: dict, workdir: Path, name: str) -> StepTimer:
    path = workdir / f"{name}.yaml"
    config = {**config, "training": {**config["training"], "output_dir": str(workdir / name)}}
    path.write_text(yaml.safe_dump(config))
    timer = StepTimer()
    QwenCLI(
        QwenClassifier,
        QwenDataModule,
        args=["fit", "--config", str(path)],
        trainer_defaults={"callbacks": [timer]},
    )
    return timer


def whole_process(command: list[str]) -> float:
    """Wall seconds of a command, start-up and all, as a user waits for it."""
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def monitor_summary(run_dir: Path) -> dict[str, float]:
    """What the monitor logged, over its windows after the first (start-up): samples/s as total samples over
    total time (comparable with this script's timing), the rest as medians."""
    (log,) = run_dir.glob("logs/version_*/metrics.csv")
    with log.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("perf/samples_per_second")][1:]
    seconds = [float(r["perf/step_time"]) for r in rows]  # windows have the same number of steps
    samples = [float(r["perf/samples_per_second"]) * t for r, t in zip(rows, seconds, strict=True)]
    summary = {"perf/samples_per_second": sum(samples) / sum(seconds)}
    for key in ("perf/tokens_per_second", "perf/tflops", "perf/data_wait_fraction"):
        summary[key] = statistics.median(float(r[key]) for r in rows)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--save_steps", type=int, default=50)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args()
    workers = auto_num_workers(
        len(os.sched_getaffinity(0)), 1, torch.cuda.is_available()
    )  # what fit's auto picks
    model, data = demo_inputs()

    config = {
        "model": {"pretrained_name": str(model), "num_labels": 10},
        "datasets": {"dataset_configs": {"mnist": {"num_classes": 10}}},
        "data": {
            "train_jsonl": str(data / "train.jsonl"),
            "val_jsonl": str(data / "val.jsonl"),
            "batch_size": args.batch_size,
            "num_workers": "auto",
        },
        "training": {
            "max_steps": args.steps,
            "epochs": 100,
            "lr": 2e-3,
            "logging_steps": 10,
            "save_steps": args.save_steps,
            "eval_steps": args.save_steps,
            "skip_evaluation": True,
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    standard = {
        **config,
        "training": {**config["training"], "skip_evaluation": False, "save_all_checkpoints": True},
        "evaluation": {"partial_eval_during_training": True, "full_eval_at_end": False},
        "best_model_tracking": {"enabled": False},
        "trainer": {**config["trainer"], "num_sanity_val_steps": 0},
    }
    no_saving = {**config, "training": {**config["training"], "save_steps": args.steps * 10}}
    no_plots = {**config, "monitor": {"plots": False}}

    variants = {"no_eval": config, "standard": standard, "no_saving": no_saving, "no_plots": no_plots}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # every comparison in alternating repeats: on a small shared machine one run differs by +-10% from the
        # next, so each ratio is taken within one repeat and the median over repeats is reported
        runs: dict[str, list] = {"bare": [], **{name: [] for name in variants}}
        bare_command = [sys.executable, "bench/bare_loop.py", "--model", str(model), "--train",
                         str(data / "train.jsonl"), "--steps", str(args.steps), "--batch_size",
                         str(args.batch_size), "--num_workers", str(workers)]  # fmt: skip
        fit_config = work / "whole.yaml"
        fit_config.write_text(
            yaml.safe_dump({**config, "training": {**config["training"], "output_dir": str(work / "whole")}})
        )
        fit_command = [sys.executable, "-m", "qwen_cls", "fit", "--config", str(fit_config),
                       "--training.overwrite_output_dir", "true"]  # fmt: skip
        whole: dict[str, list[float]] = {"bare": [], "fit": []}
        for i in range(args.repeats):
            runs["bare"].append(
                bare_loop(str(model), str(data / "train.jsonl"), args.steps, args.batch_size, workers, 2e-3)
            )
            for name, variant in variants.items():
                runs[name].append(run_fit(variant, work, f"{name}_{i}"))
            whole["bare"].append(whole_process(bare_command))
            whole["fit"].append(whole_process(fit_command))
        monitored = monitor_summary(work / f"no_eval_{args.repeats - 1}")
    loader_one_process = data_path(str(model), str(data / "train.jsonl"), 40, args.batch_size, 0)
    loader_workers = data_path(str(model), str(data / "train.jsonl"), 40, args.batch_size, 1)

    def ratios(fn) -> str:
        values = [fn(i) for i in range(args.repeats)]
        return f"{statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f})"

    no_eval = runs["no_eval"]
    rate = statistics.median(r.steps_per_second for r in no_eval)
    train_images = rate * args.batch_size
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "bare_loop_steps_per_s": round(statistics.median(b["steps_per_second"] for b in runs["bare"]), 3),
        "qwen_cls_steps_per_s": round(rate, 3),
        "num_workers (auto)": workers,
        "framework_ratio": ratios(
            lambda i: no_eval[i].steps_per_second / runs["bare"][i]["steps_per_second"]
        ),
        "framework_ratio_without_mid_run_saves": ratios(
            lambda i: runs["no_saving"][i].steps_per_second / runs["bare"][i]["steps_per_second"]
        ),
        "whole_process_s bare / qwen-cls fit": f"{statistics.median(whole['bare']):.1f} / {statistics.median(whole['fit']):.1f}",
        "whole_process_ratio (bare / fit)": ratios(lambda i: whole["bare"][i] / whole["fit"][i]),
        "ms_swift": "installed, not wired into this script yet"
        if find_spec("swift")
        else "not installed: skipped",
        "skip_eval_time_ratio": ratios(lambda i: no_eval[i].fit_seconds / runs["standard"][i].fit_seconds),
        "keep_every_checkpoint_time_ratio": ratios(
            lambda i: runs["no_saving"][i].steps_per_second / no_eval[i].steps_per_second
        ),
        "plots_time_ratio": ratios(
            lambda i: runs["no_plots"][i].steps_per_second / no_eval[i].steps_per_second
        ),
        "training_images_per_s": round(train_images, 1),
        "loader_images_per_s_one_process": round(loader_one_process, 1),
        "loader_images_per_s_1_worker": round(loader_workers, 1),
        "loader_headroom_1_worker": round(loader_workers / train_images, 2),
        "monitor_samples_per_s": round(monitored["perf/samples_per_second"], 1),
        "monitor_vs_bench_samples_ratio": round(
            monitored["perf/samples_per_second"] / (no_eval[-1].steps_per_second * args.batch_size), 3
        ),
        "monitor_tokens_per_s": round(monitored["perf/tokens_per_second"], 0),
        "monitor_tflops": round(monitored["perf/tflops"], 4),
        "monitor_data_wait_fraction": round(monitored["perf/data_wait_fraction"], 3),
    }
    report(results, args.out)


if __name__ == "__main__":
    main()

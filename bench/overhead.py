"""Side-by-side timings on one machine, in one run (`make bench`). Prints ratios; asserts nothing.

1. framework overhead: `qwen-cls fit` (no-evaluation mode, defaults) vs a bare PyTorch loop doing the same
   work (checkpoints every `save_steps`, written as a hand-written loop writes them: `bench/bare_loop.py`),
   training steps/s in the loop and whole processes (start-up included); the same without mid-run
   checkpoints in either (training alone); ms-swift's `seq_cls` on the same work, whole process, when
   `make bench-peer` has built its environment (skipped otherwise: `bench/peer_swift.py`); all in
   alternating repeats, each ratio taken within a repeat, median and range;
2. skip-evaluation speed-up: no-evaluation vs standard mode (full validation every `save_steps`),
   same steps and checkpoints, wall time of the fit;
3. cost of keeping every checkpoint: training steps/s saving every `save_steps` vs saving nothing until
   the end (the final save falls outside the timed steps);
4. data path: images/s out of the training DataLoader (one process, and with the run's workers) vs the
   images/s training consumes;
5. cost of redrawing the plots at each checkpoint (``monitor.plots: true``) vs the default (``auto``: at
   the end only where training takes every core, as here);
6. what the run's own monitor logged (``perf/*`` in its metrics.csv) next to this script's timing.

Uses the tiny Qwen2.5-VL and the MNIST demo data (built under outputs/ if missing).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from bare_loop import bare_loop
from data_path import data_path
from inputs import demo_inputs
from lightning.pytorch import Callback
from peer_swift import ITS_DEFAULTS, swift_command, swift_dataset, swift_env, swift_sft
from report import report

from qwen_cls.console import quiet_library_chatter
from qwen_cls.data import DEFAULT_PROMPT, QwenDataModule, auto_num_workers
from qwen_cls.model import QwenClassifier
from qwen_cls.train import QwenCLI


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
        now = time.perf_counter(), time.process_time()
        self.steps += 1
        if self.steps == 1:
            self.first = now
        self.last = now

    @property
    def steps_per_second(self) -> float:
        return (self.steps - 1) / (self.last[0] - self.first[0])

    @property
    def cpu_seconds_per_step(self) -> float:
        """CPU time of this process (all its threads) per step: the work, whatever else the machine runs."""
        return (self.last[1] - self.first[1]) / (self.steps - 1)


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


def whole_process(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds of a command, start-up and all, as a user waits for it; and the CPU seconds (user + system)
    it and its children used: the work, which a busy shared host does not inflate as it does wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{out.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    quiet_library_chatter()
    workers = auto_num_workers(
        len(os.sched_getaffinity(0)), 1, torch.cuda.is_available()
    )  # what fit's auto picks
    model, data = demo_inputs()
    lr = 2e-3

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
            "lr": lr,
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
    plots_always = {**config, "monitor": {"plots": True}}

    variants = {"no_eval": config, "standard": standard, "no_saving": no_saving, "plots_always": plots_always}
    swift = swift_command()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # every comparison in alternating repeats: on a small shared machine one run differs by +-10% from the
        # next, so each ratio is taken within one repeat and the median over repeats is reported
        runs: dict[str, list] = {"bare": [], "bare_saving": [], **{name: [] for name in variants}}
        train = str(data / "train.jsonl")
        bare_command = [sys.executable, "bench/bare_loop.py", "--model", str(model), "--train", train,
                        "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--num_workers",
                        str(workers), "--save_steps", str(args.save_steps), "--output_dir", str(work / "bare")]  # fmt: skip
        fit_config = work / "whole.yaml"
        fit_config.write_text(
            yaml.safe_dump({**config, "training": {**config["training"], "output_dir": str(work / "whole")}})
        )
        fit_command = [sys.executable, "-m", "qwen_cls", "fit", "--config", str(fit_config),
                       "--training.overwrite_output_dir", "true"]  # fmt: skip
        whole: dict[str, list[tuple[float, float]]] = {
            "bare": [],
            "fit": [],
            "swift": [],
            "swift_defaults": [],
        }
        if swift:
            pixels = 56 * 56  # the tiny processor's fixed image area (processor_config.json: size)
            dataset = swift_dataset(data / "train.jsonl", work / "swift.jsonl", DEFAULT_PROMPT)
            swift_run = swift_sft(swift, model.resolve(), dataset, work / "swift", args.steps, args.batch_size,
                                  args.save_steps, lr)  # fmt: skip
        for i in range(args.repeats):
            runs["bare"].append(bare_loop(str(model), train, args.steps, args.batch_size, workers, lr))
            runs["bare_saving"].append(
                bare_loop(str(model), train, args.steps, args.batch_size, workers, lr, args.save_steps,
                          str(work / f"bare_saving_{i}"))
            )  # fmt: skip
            for name, variant in variants.items():
                runs[name].append(run_fit(variant, work, f"{name}_{i}"))
            whole["bare"].append(whole_process(bare_command))
            whole["fit"].append(whole_process(fit_command))
            if swift:
                whole["swift"].append(whole_process(swift_run, swift_env(pixels)))
                whole["swift_defaults"].append(whole_process(swift_run + ITS_DEFAULTS, swift_env(pixels)))
        monitored = monitor_summary(work / f"no_eval_{args.repeats - 1}")
    loader_one_process = data_path(str(model), train, 40, args.batch_size, 0)
    loader_workers = data_path(str(model), train, 40, args.batch_size, 1)

    def ratios(fn) -> str:
        values = [fn(i) for i in range(args.repeats)]
        return f"{statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f})"

    def rate(name: str, i: int) -> float:
        run = runs[name][i]
        return run["steps_per_second"] if isinstance(run, dict) else run.steps_per_second

    def cpu(name: str, i: int) -> float:
        run = runs[name][i]
        return run["cpu_seconds_per_step"] if isinstance(run, dict) else run.cpu_seconds_per_step

    def seconds(name: str, k: int) -> str:  # k: 0 wall, 1 CPU
        return f"{statistics.median(w[k] for w in whole[name]):.1f}"

    def fixed(process: str, loop: str) -> float:
        """Start-up and shut-down: process start to first step, last step to exit (median over repeats)."""
        return statistics.median(
            whole[process][i][0] - args.steps / rate(loop, i) for i in range(args.repeats)
        )

    no_eval = runs["no_eval"]
    fit_rate = statistics.median(r.steps_per_second for r in no_eval)
    train_images = fit_rate * args.batch_size
    skipped = "skipped: no .venv-swift (make bench-peer)"
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "steps": args.steps,
        "save_steps": args.save_steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "num_workers (auto)": workers,
        "bare_loop_steps_per_s (saving)": round(statistics.median(rate("bare_saving", i) for i in range(args.repeats)), 3),
        "qwen_cls_steps_per_s": round(fit_rate, 3),
        "in_loop, same work: bare / fit, wall time": ratios(lambda i: rate("no_eval", i) / rate("bare_saving", i)),
        "in_loop, same work: bare / fit, CPU time": ratios(lambda i: cpu("bare_saving", i) / cpu("no_eval", i)),
        "in_loop, training only (no mid-run saves in either): bare / fit, wall": ratios(
            lambda i: rate("no_saving", i) / rate("bare", i)
        ),
        "in_loop, training only: bare / fit, CPU time": ratios(lambda i: cpu("bare", i) / cpu("no_saving", i)),
        "whole process s, wall: bare / qwen-cls fit": f"{seconds('bare', 0)} / {seconds('fit', 0)}",
        "whole process s, CPU: bare / qwen-cls fit": f"{seconds('bare', 1)} / {seconds('fit', 1)}",
        "whole process: bare / fit, wall": ratios(lambda i: whole["bare"][i][0] / whole["fit"][i][0]),
        "fixed cost s (whole process less its steps at the in-loop rate): bare / fit": f"{fixed('bare', 'bare_saving'):.2f} / {fixed('fit', 'no_eval'):.2f}",
        "fixed cost s: fit's over the bare loop's": f"{fixed('fit', 'no_eval') - fixed('bare', 'bare_saving'):+.2f}",
        "whole process: bare / fit, CPU": ratios(lambda i: whole["bare"][i][1] / whole["fit"][i][1]),
        "ms-swift whole process s, wall / CPU": f"{seconds('swift', 0)} / {seconds('swift', 1)}" if swift else skipped,
        "ms-swift / qwen-cls fit, whole process, wall": ratios(lambda i: whole["swift"][i][0] / whole["fit"][i][0]) if swift else skipped,
        "ms-swift / qwen-cls fit, whole process, CPU": ratios(lambda i: whole["swift"][i][1] / whole["fit"][i][1]) if swift else skipped,
        "ms-swift with its defaults (vision tower and merger frozen, activations recomputed) / qwen-cls fit, wall": ratios(lambda i: whole["swift_defaults"][i][0] / whole["fit"][i][0]) if swift else skipped,
        "skip_eval_time_ratio": ratios(lambda i: no_eval[i].fit_seconds / runs["standard"][i].fit_seconds),
        "keep_every_checkpoint_time_ratio": ratios(lambda i: rate("no_saving", i) / rate("no_eval", i)),
        "plots_every_checkpoint_time_ratio": ratios(lambda i: rate("no_eval", i) / rate("plots_always", i)),
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
    }  # fmt: skip
    report(results, args.out)


if __name__ == "__main__":
    main()

"""`qwen-cls evaluate-all` over N checkpoints vs N separate `qwen-cls evaluate` processes, and evaluate-all on
2 processes (DDP, ZeRO-3) vs 1 (`make bench`).

All are timed as a user runs them (whole commands, start-up included), on the same run folder and data. On a
2-core machine, 2 processes share the cores one process's threads already use: the ratio says what the split
itself costs or gains here, not what 2 GPUs do.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from inputs import demo_inputs
from report import report

from qwen_cls.run_dir import list_checkpoints


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qwen_cls", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--out", default="bench/results/eval_all.json")
    args = ap.parse_args()
    model, data = demo_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        config = {
            "model": {"pretrained_name": str(model), "num_labels": 10},
            "datasets": {"dataset_configs": {"mnist": {"num_classes": 10}}},
            "data": {"train_jsonl": str(data / "train.jsonl"), "batch_size": 32, "num_workers": 1},
            "training": {
                "max_steps": 10 * args.checkpoints,
                "save_steps": 10,
                "lr": 2e-3,
                "output_dir": str(run),
                "skip_evaluation": True,
            },
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        }
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        timed(["fit", "--config", str(path)])
        checkpoints = list_checkpoints(run)
        separate = sum(
            timed(["evaluate", "--checkpoint_path", str(c), "--eval_data", str(data / "val.jsonl")])
            for c in checkpoints
        )
        every = ["evaluate-all", str(run), "--eval_data", str(data / "val.jsonl"), "--wandb", "false"]
        together = timed([*every, "--output_dir", str(Path(tmp) / "eval")])
        ddp = timed([*every, "--output_dir", str(Path(tmp) / "ddp"), "--devices", "2", "--strategy", "ddp"])
        zero3 = timed(
            [
                *every,
                "--output_dir",
                str(Path(tmp) / "z3"),
                "--devices",
                "2",
                "--strategy",
                "deepspeed_stage_3",
            ]
        )
        same = all(
            (Path(tmp) / name / "eval_all_classes.csv").read_text()
            == (Path(tmp) / "eval" / "eval_all_classes.csv").read_text()
            for name in ("ddp", "z3")
        )
    results = {
        "checkpoints": len(checkpoints),
        "eval_rows": 1000,
        "separate_evaluate_s": round(separate, 2),
        "evaluate_all_s": round(together, 2),
        "ratio": round(together / separate, 3),
        "evaluate_all_ddp_x2_s": round(ddp, 2),
        "evaluate_all_zero3_x2_s": round(zero3, 2),
        "ddp_x2_over_one": round(ddp / together, 3),
        "zero3_x2_over_one": round(zero3 / together, 3),
        "per_class_results_identical": same,
    }
    report(results, args.out)


if __name__ == "__main__":
    main()

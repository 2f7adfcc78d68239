"""Where the per-step Python time goes in `qwen-cls fit` (tiny model, CPU): cProfile over a no-evaluation run,
own time (tottime) summed by who owns the code: qwen_cls, lightning, torch (model math and autograd,
including its C++ calls), transformers (the model's Python), data (PIL, the processor, tokenizers) and the
rest. Per step, in milliseconds. `python bench/profile_step.py [--steps 100]`
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import yaml
from inputs import demo_inputs

from qwen_cls.train import run_lightning_cli

OWNERS = {"qwen_cls": "/qwen_cls/", "lightning": "/lightning/", "torch": "/torch/", "transformers": "/transformers/",
          "data (PIL, processor, tokenizers)": ("/PIL/", "/tokenizers/", "image_processing", "processing_")}  # fmt: skip


def owner(filename: str) -> str:
    for name, marks in OWNERS.items():
        marks = marks if isinstance(marks, tuple) else (marks,)
        if any(m in filename for m in marks):
            return name
    return "C builtins" if filename == "~" else "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args()
    model, data = demo_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "model": {"pretrained_name": str(model), "num_labels": 10},
            "datasets": {"dataset_configs": {"mnist": {"num_classes": 10}}},
            "data": {"train_jsonl": str(data / "train.jsonl"), "batch_size": args.batch_size, "num_workers": 0},
            "training": {"max_steps": args.steps, "epochs": 100, "lr": 2e-3, "logging_steps": 10,
                         "save_steps": args.steps, "skip_evaluation": True, "output_dir": f"{tmp}/run"},
            "monitor": {"plots": False},
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        }  # fmt: skip
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        profiler = cProfile.Profile()
        profiler.enable()
        run_lightning_cli(["fit", "--config", str(path)])
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    totals: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.items():
        totals[owner(filename)] = totals.get(owner(filename), 0.0) + tottime
    print(
        f"\n| own time per step (ms), {args.steps} steps, batch {args.batch_size}, data in the main process | ms |"
    )
    print("| --- | --- |")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1000 * seconds / args.steps:.2f} |")
    ours = sorted(((k, v) for k, v in stats.items() if "/qwen_cls/" in k[0]), key=lambda kv: -kv[1][2])[:6]
    print("\nours, by function (ms per step): " + ", ".join(
        f"{Path(f).stem}.{fn} {1000 * v[2] / args.steps:.2f}" for (f, _, fn), v in ours))  # fmt: skip


if __name__ == "__main__":
    main()

"""Full fine-tune vs LoRA on a ~200 M-parameter Qwen2.5-VL (random weights from a config; CPU): trainable
parameters, peak host memory, steps/s and the bytes of one checkpoint, each run in its own process
(`make bench`). Prints; asserts nothing.

    python bench/lora.py [--steps 12] [--layers 18] [--r 16]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from checkpoint_cost import du, make_model
from inputs import demo_inputs

REPO = Path(__file__).resolve().parents[1]


def one_run(config_path: str) -> None:
    """In a child process: fit, then the parameter counts and the process's peak RSS."""
    from qwen_cls.train import run_lightning_cli

    net = run_lightning_cli(["fit", "--config", config_path], exit_on_error=False).model.net
    named = list(net.named_parameters())
    result = {
        "trainable": sum(p.numel() for _, p in named if p.requires_grad),
        "total": sum(p.numel() for n, p in named if ".lora_" not in n),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run(work: Path, base: dict, name: str, lora: dict | None) -> dict:
    config = json.loads(json.dumps(base))
    config["training"]["output_dir"] = str(work / name)
    if lora:
        config["model"]["lora"] = lora
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    log = next((work / name / "logs").glob("version_*/metrics.csv"))
    with log.open() as fh:
        times = [float(r["perf/step_time"]) for r in csv.DictReader(fh) if r.get("perf/step_time")]
    result["steps_per_second"] = 1 / times[-1]  # the last logging window (the first holds start-up)
    checkpoint = sorted((work / name).glob("checkpoint-*"))[-1]
    result["state_bytes"] = du(checkpoint / "deepspeed")
    result["hf_bytes"] = du(checkpoint / "hf_model")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    if args.one:
        return one_run(args.one)
    _, data = demo_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_model(work / "model", args.layers)
        every = args.steps // 2
        base = {
            "model": {"pretrained_name": str(work / "model"), "num_labels": 10},
            "datasets": {"dataset_configs": {"mnist": {"num_classes": 10}}},
            "data": {"train_jsonl": str(data / "train.jsonl"), "batch_size": 2, "num_workers": 0},
            "training": {"max_steps": args.steps, "lr": 1e-4, "logging_steps": every, "save_steps": args.steps,
                         "skip_evaluation": True, "disk_check": "off", "background_save": False},
            "monitor": {"plots": False},
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        }  # fmt: skip
        full = run(work, base, "full", None)
        lora = run(work, base, "lora", {"enabled": True, "r": args.r, "alpha": 2 * args.r, "dropout": 0.05})
    print(
        f"\n{full['total'] / 1e6:.0f} M parameters, {args.steps} steps of 2 images, fp32, CPU ({os.cpu_count()} threads)"
    )
    print(
        "| | trainable parameters | peak host memory | steps/s | resumable state per checkpoint | hf_model/ |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in (("full fine-tune", full), (f"LoRA r={args.r}", lora)):
        print(
            f"| {name} | {r['trainable'] / 1e6:.2f} M ({100 * r['trainable'] / full['total']:.2f}%) | "
            f"{r['peak_rss'] / 2**30:.2f} GiB | {r['steps_per_second']:.2f} | {r['state_bytes'] / 2**20:.0f} MiB | "
            f"{r['hf_bytes'] / 2**20:.0f} MiB |"
        )
    print(
        f"LoRA / full: peak memory {lora['peak_rss'] / full['peak_rss']:.2f}, steps/s "
        f"{lora['steps_per_second'] / full['steps_per_second']:.2f}, state {lora['state_bytes'] / full['state_bytes']:.3f}"
    )


if __name__ == "__main__":
    main()

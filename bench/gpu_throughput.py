"""Throughput of `qwen-cls fit` on the Qwen2.5-VL-3B architecture (random weights, published dimensions, no
download), bf16, 448 px images, one GPU: samples/s, TFLOP/s and MFU from the monitor's analytical FLOPs,
peak memory, with and without gradient checkpointing, and the wall-time ratio of no-evaluation vs standard
mode (evaluation every 10 steps). bf16-true (bf16 weights and AdamW states: a 3B checkpoint is ~30 GB, and
each run saves once, at its end, then is deleted: the device has 64 GB of disk). Each configuration runs as its own `qwen-cls fit` process; numbers are medians over the logging
steps after warm-up, read from the run's metrics.csv. `--tiny` runs the same path on the tiny model (CPU).

    python bench/gpu_throughput.py [--tiny] [--steps 40] [--out bench/results/gpu_throughput.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qwen_cls.tiny import build_processor, build_tokenizer, make_tiny

REPO = Path(__file__).resolve().parents[1]
# Qwen2.5-VL-3B-Instruct's config.json (published dimensions)
TEXT_3B = {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
           "intermediate_size": 11008, "vocab_size": 151936, "max_position_embeddings": 128000,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}  # fmt: skip
VISION_3B = {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "num_heads": 16, "intermediate_size": 3420,
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
             "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}  # fmt: skip


def make_3b(folder: Path, image_size: int) -> Path:
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    special = {
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    config = Qwen2_5_VLConfig(
        text_config={**TEXT_3B, **special},
        vision_config=VISION_3B,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    build_processor(tokenizer, image_size).save_pretrained(folder)
    return folder


def make_images(folder: Path, n: int, size: int) -> Path:
    """n random RGB images of size² pixels, 10 classes."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / "img" / f"{i}.png"
        )
        lines.append(json.dumps({"image_path": f"img/{i}.png", "label": i % 10}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def fit(config: dict, work: Path, name: str, **training) -> dict:
    config = json.loads(json.dumps(config))
    config["training"].update(output_dir=str(work / name), **training)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "qwen_cls", "fit", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    metrics = sorted((work / name / "logs").glob("version_*/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("perf/samples_per_second")][1:]  # skip warm-up
    shutil.rmtree(work / name)  # a 3B checkpoint is ~30 GB; the device's disk holds two

    def median(key: str) -> float | None:
        values = [float(r[key]) for r in rows if r.get(key)]
        return round(statistics.median(values), 4) if values else None

    return {"wall_s": round(wall, 1), "samples_per_s": median("perf/samples_per_second"), "tflops": median("perf/tflops"),
            "mfu": median("perf/mfu"), "peak_gpu_memory_gb": median("system/gpu_memory_max_allocated_gb")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny model on CPU (checks the script itself)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_throughput.json"))
    args = parser.parse_args()
    size = 56 if args.tiny else 448
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny(work / "model") if args.tiny else make_3b(work / "model", size)
        data = make_images(work / "data", 4 * args.batch_size, size)
        config = {
            "model": {"pretrained_name": str(model), "num_labels": 10},
            "datasets": {"dataset_configs": {"synthetic": {"num_classes": 10}}},
            "data": {"train_jsonl": str(data), "val_jsonl": str(data), "batch_size": args.batch_size, "num_workers": 4},
            "training": {"max_steps": args.steps, "epochs": 10**4, "lr": 1e-5, "logging_steps": 5, "save_steps": 10**6,
                         "skip_evaluation": True, "disk_check": "off"},
            "monitor": {"plots": False},
            "trainer": {"accelerator": "cpu" if args.tiny else "gpu", "devices": 1, "enable_progress_bar": False,
                        "precision": "32-true" if args.tiny else "bf16-true"},
        }  # fmt: skip
        results = {"model": "tiny" if args.tiny else "Qwen2.5-VL-3B architecture", "image_px": size,
                   "batch_size": args.batch_size, "steps": args.steps,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}  # fmt: skip
        results["no_eval"] = fit(config, work, "no_eval")
        results["no_eval_gradient_checkpointing"] = fit(config, work, "gc", gradient_checkpointing=True)
        results["standard_eval_every_10"] = fit(
            config, work, "standard", skip_evaluation=False, eval_steps=10,
            best_model_tracking={"enabled": False},
        )  # fmt: skip
        results["no_eval_vs_standard_wall_ratio"] = round(
            results["no_eval"]["wall_s"] / results["standard_eval_every_10"]["wall_s"], 3
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

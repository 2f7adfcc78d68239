"""vLLM vs `qwen-cls predict` on the same CPU and images (`make bench`; needs `make serve-env`). Asserts nothing.

A tiny Qwen2.5-VL whose heads vLLM's CPU attention takes (hidden 128, head size 64) trains a few steps with class
names and is exported with `qwen-cls export --format vllm`; then the same validation images are classified by
`Predictor` (batches of `--batch_size`, after one warm-up batch) and by vLLM offline (`scripts/vllm_classify.py`,
float32, eager; its engine start is reported apart). Prints images/s of each, their ratio, the largest difference
between their probabilities and whether the top-1 labels agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from inputs import demo_inputs
from report import report

import qwen_cls
from qwen_cls.commands import export
from qwen_cls.predict import Predictor
from qwen_cls.tiny import make_tiny

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/serve.json")
    parser.add_argument(
        "--vllm_python", default=str(VLLM_PYTHON), help="an interpreter with vllm (a GPU's own)"
    )
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (float32 compares exactly)")
    args = parser.parse_args()
    if not Path(args.vllm_python).is_file():
        sys.exit(f"no {args.vllm_python}: make serve-env")
    _, data = demo_inputs()
    rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()[: args.images]]
    images = [str(data / row["image_path"]) for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny(work / "tiny64", hidden_size=128, head_dim=64)
        names = [str(i) + "-digit" for i in range(10)]
        qwen_cls.fit(
            {
                "model": {"pretrained_name": str(model), "num_labels": 10},
                "datasets": {"dataset_configs": {"mnist": {"num_classes": 10, "class_names": names}}},
                "data": {"train_jsonl": str(data / "train.jsonl"), "batch_size": 16, "num_workers": 0},
                "training": {"max_steps": 20, "save_steps": 20, "lr": 2e-3, "output_dir": str(work / "run"),
                             "skip_evaluation": True},
                "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
            }
        )  # fmt: skip
        checkpoint = work / "run" / "checkpoint-20"
        served = export(str(checkpoint), str(work / "vllm"), format="vllm")

        predictor = Predictor(checkpoint, batch_size=args.batch_size)
        predictor.predict(images[: args.batch_size], top_k=10)  # warm-up
        start = time.perf_counter()
        ours = predictor.predict(images, top_k=10)
        predict_seconds = time.perf_counter() - start

        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        command = [args.vllm_python, str(REPO / "scripts" / "vllm_classify.py"), str(served), *images,
                   "--enforce_eager", "--dtype", args.dtype, "--max_model_len", "512"]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        theirs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        timing = next(line for line in out.stderr.splitlines() if line.startswith("vLLM: engine ready"))
        ready = float(timing.split("engine ready in ")[1].split(" s")[0])
        vllm_seconds = float(timing.split("classified in ")[1].split(" s")[0])

    diff = max(
        abs(p - mine["probabilities"][mine["indices"].index(j)])
        for mine, other in zip(ours, theirs, strict=True)
        for j, p in enumerate(other["probabilities"])
    )
    agree = sum(mine["labels"][0] == other["label"] for mine, other in zip(ours, theirs, strict=True))
    results = {
        "machine": f"{os.cpu_count()} cores, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "images": len(images),
        f"qwen-cls predict images/s (batch {args.batch_size})": round(len(images) / predict_seconds, 1),
        f"vLLM offline images/s ({args.dtype}, eager; engine start excluded)": round(
            len(images) / vllm_seconds, 1
        ),
        "vLLM / predict": round(predict_seconds / vllm_seconds, 2),
        "vLLM engine start s": ready,
        "largest probability difference": f"{diff:.2e}",
        "top-1 labels agreeing": f"{agree} / {len(images)}",
    }
    report(results, args.out)


if __name__ == "__main__":
    main()

"""Classify images with vLLM, offline, from a folder that `qwen-cls export --format vllm` wrote.

Runs in vLLM's own environment (`make serve-env` builds `.venv-vllm`, with qwen-cls installed there without its
dependencies for `qwen_cls.images`, the conversion to RGB that training used):

    .venv-vllm/bin/python scripts/vllm_classify.py EXPORT IMAGE [IMAGE ...] [--dataset NAME]

prints one JSON line per image: its top label (a class name), index and the probabilities over the dataset's
columns (the other datasets' columns masked, as `qwen-cls predict` does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the folder of qwen-cls export --format vllm")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--dataset", help="whose prompt and columns (needed for a multi-dataset model)")
    parser.add_argument("--max_model_len", type=int, default=2048)
    parser.add_argument(
        "--enforce_eager", action="store_true", help="no compiled graphs (quicker start on a CPU)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="vLLM's: auto serves a float32 model in float16 on a CPU; float32 matches it",
    )
    args = parser.parse_args()
    os.environ.setdefault(
        "VLLM_CPU_KVCACHE_SPACE", "1"
    )  # GiB of KV cache on a CPU: a classifier needs little

    from PIL import Image
    from vllm import LLM

    from qwen_cls.images import to_rgb

    serving = json.loads((Path(args.model) / "serving.json").read_text())
    datasets = {d["name"]: d for d in serving["datasets"]}
    if args.dataset is None and len(datasets) > 1:
        parser.error(f"--dataset: the model serves {', '.join(datasets)}; name one")
    dataset = datasets[args.dataset] if args.dataset else next(iter(datasets.values()))
    started = time.perf_counter()
    llm = LLM(
        args.model,
        runner="pooling",
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=args.enforce_eager,
    )
    ready = time.perf_counter()
    images = []
    for path in args.images:
        with Image.open(path) as image:
            images.append(to_rgb(image))
    outputs = llm.classify(
        [{"prompt": dataset["prompt"], "multi_modal_data": {"image": im}} for im in images]
    )
    done = time.perf_counter()
    print(
        f"vLLM: engine ready in {ready - started:.1f} s; {len(images)} images read and classified in "
        f"{done - ready:.2f} s ({len(images) / (done - ready):.1f} images/s)",
        file=sys.stderr,
    )
    start, end = dataset["columns"] if serving["logits_masking"] else (0, serving["num_labels"])
    for path, output in zip(args.images, outputs, strict=True):
        probs = output.outputs.probs[start:end]
        total = sum(probs)
        probs = [p / total for p in probs]
        top = max(range(len(probs)), key=probs.__getitem__)
        names = dataset["class_names"]
        label = names[top] if top < len(names) else str(top)
        print(json.dumps({"input": path, "label": label, "index": top, "probabilities": probs}), flush=True)


if __name__ == "__main__":
    main()

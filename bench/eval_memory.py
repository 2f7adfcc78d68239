"""Each rank's peak memory when `qwen-cls evaluate` runs in one process vs ZeRO-3 over 2 processes (`make bench`).

The model is a random Qwen2.5-VL large enough for its weights to dominate a process's memory (hidden 1024,
24 layers, ~0.3 B parameters, ~1.2 GB in fp32). One training step makes a checkpoint of it; the checkpoint is
then evaluated on 32 images (a) in one process and (b) with ``--devices 2 --strategy deepspeed_stage_3``. Every
50 ms the bench reads each process of the command from /proc: its anonymous memory (``RssAnon``: what the
process itself holds, weights included) and its resident set (``VmRSS``, which adds the pages of files it has
mapped, the safetensors read while loading: the kernel can drop those at any time). Reported: each rank's
peaks, the ratios against the one process, and the same after taking away a process's fixed cost (the peak of
the same command on the 0.3 M-parameter tiny model).

glibc keeps the memory of large freed tensors for reuse rather than giving it back (ZeRO-3 builds each module
whole, then partitions it): without ``MALLOC_MMAP_THRESHOLD_`` a rank's resident memory stayed ~0.8 GB above what it
held. The commands run with ``MALLOC_MMAP_THRESHOLD_=131072``, so large blocks go back to the system when freed
and the peaks are what the processes hold. (On a GPU the weights live in device memory; this is the host's.)
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

import psutil
import yaml
from inputs import demo_inputs
from report import report

from qwen_cls.tiny import make_tiny


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peaks_of(args: list[str]) -> list[dict[str, float]]:
    """Run ``qwen-cls ARGS``; per process with rank work (the command and Lightning's children), peak GB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen_cls", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    peaks: dict[int, dict[str, int]] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            peak = peaks.setdefault(p.pid, {"anon": 0, "rss": 0})
            peak["anon"] = max(peak["anon"], status_kib(p.pid, "RssAnon"))
            peak["rss"] = max(peak["rss"], status_kib(p.pid, "VmRSS"))
        time.sleep(0.05)
    if process.returncode:
        raise SystemExit(process.stderr.read().decode()[-3000:])
    ranks = sorted(peaks.values(), key=lambda p: -p["anon"])
    ranks = [p for p in ranks if p["anon"] > 200 * 1024]  # the ranks; not a short-lived helper process
    return [{k: round(v / 2**20, 3) for k, v in p.items()} for p in ranks]


def checkpoint_of(model: Path, data: Path, tmp: Path) -> Path:
    run = tmp / f"run-{model.name}"
    config = {
        "model": {"pretrained_name": str(model), "num_labels": 10},
        "datasets": {"dataset_configs": {"mnist": {"num_classes": 10}}},
        "data": {"train_jsonl": str(data / "train.jsonl"), "batch_size": 2, "num_workers": 0},
        "training": {"max_steps": 1, "save_steps": 1, "output_dir": str(run), "skip_evaluation": True},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "monitor": {"plots": False},
    }
    path = tmp / f"{model.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [sys.executable, "-m", "qwen_cls", "fit", "--config", str(path)], check=True, capture_output=True
    )
    return run / "checkpoint-1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden_size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out", default="bench/results/eval_memory.json")
    args = ap.parse_args()
    tiny, data = demo_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = data.joinpath("val.jsonl").read_text().splitlines()[:32]
        eval_data = tmp / "val32.jsonl"
        eval_data.write_text(
            "".join(
                json.dumps(
                    {**json.loads(r), "image_path": str((data / json.loads(r)["image_path"]).resolve())}
                )
                + "\n"
                for r in rows
            )
        )
        big = make_tiny(tmp / "big", hidden_size=args.hidden_size, layers=args.layers, head_dim=64)
        measured = {}
        for name, model in (("tiny", tiny), ("big", big)):
            checkpoint = checkpoint_of(model, data, tmp)
            base = [
                "evaluate",
                "--checkpoint_path",
                str(checkpoint),
                "--eval_data",
                str(eval_data),
                "--accelerator",
                "cpu",
            ]
            measured[name] = {
                "one": peaks_of(base),
                "zero3": peaks_of([*base, "--devices", "2", "--strategy", "deepspeed_stage_3"]),
            }
        weights_gb = sum(f.stat().st_size for f in (checkpoint / "hf_model").glob("*.safetensors")) / 2**30
    one, zero3 = measured["big"]["one"][0], measured["big"]["zero3"][:2]
    fixed_one, fixed_zero3 = measured["tiny"]["one"][0], measured["tiny"]["zero3"][:2]
    results = {
        "model": f"Qwen2.5-VL hidden {args.hidden_size}, {args.layers} layers",
        "weights_gb_fp32": round(weights_gb, 3),
        "one_process_peak_gb": one,
        "zero3_rank_peaks_gb": zero3,
        "fixed_cost_gb (tiny model)": {"one": fixed_one, "zero3": fixed_zero3},
        # one process maps the weights from the file (page cache, in VmRSS, not RssAnon); a ZeRO-3 rank holds its
        # partition in its own memory, and rank 0 also maps the whole file once while it loads the others' values
        "weights_held_gb": {
            "one (rss above fixed)": round(one["rss"] - fixed_one["rss"], 3),
            "zero3 ranks (anon above fixed)": [
                round(r["anon"] - f["anon"], 3) for r, f in zip(zero3, fixed_zero3, strict=True)
            ],
            "zero3 ranks (rss above fixed; rank 0 maps the whole file while it loads)": [
                round(r["rss"] - f["rss"], 3) for r, f in zip(zero3, fixed_zero3, strict=True)
            ],
        },
    }
    held_one = results["weights_held_gb"]["one (rss above fixed)"]
    results["rank_over_one_process"] = [
        round(r / held_one, 3) for r in results["weights_held_gb"]["zero3 ranks (anon above fixed)"]
    ]
    report(results, args.out)


if __name__ == "__main__":
    main()

"""What keeping every checkpoint costs, measured in one run (`make bench`). Prints; asserts nothing.

A ~200 M-parameter Qwen2.5-VL (random weights, built from a config: no download) trains a few dozen steps on
CPU with a save every few steps, in separate processes:

- bytes per save and for the whole run: every state kept vs ``training.keep_state_last_n: 1``;
- training stall per save: wall time the training loop is blocked in the save (including the wait for the
  previous background write), synchronous vs background (``training.background_save``);
- the run's fit wall time with a save every few steps vs the same run saving only at the end;
- the same stall on DeepSpeed ZeRO-2 (one CPU process over gloo) when DeepSpeed is installed;
- what one background write costs: its wall time and the CPU time of the writing thread.

Training runs on ``--threads`` CPU threads (default: all cores but one), so the writing thread has a core of
its own, as it has on a GPU node, where the math runs on the GPU and host cores are idle; with every core
computing, writing and training take turns on the same cores and nothing can be hidden.
- bytes per save and per run projected for Qwen2.5-VL 3B / 7B / 72B from their parameter counts.

    python bench/checkpoint_cost.py [--steps 24] [--every 6] [--layers 18] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch
import yaml
from inputs import demo_inputs
from transformers import Qwen2_5_VLForConditionalGeneration

from qwen_cls.tiny import build_processor, build_tokenizer, qwen_vl_config

REPO = Path(__file__).resolve().parents[1]


def make_model(folder: Path, layers: int) -> int:
    """A Qwen2.5-VL language model of 1024 wide x ``layers`` (~11 M parameters a layer) and a small vision
    tower, random weights; returns the parameter count."""
    tokenizer = build_tokenizer()
    text = {
        "hidden_size": 1024,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 2816,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "out_hidden_size": 1024,
        "num_heads": 4,
        "intermediate_size": 128,
        "fullatt_block_indexes": [1],
    }
    config = qwen_vl_config(tokenizer, text, vision)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def one_run(config_path: str, threads: int) -> None:
    """In a child process: fit, timing every save (the loop is blocked for it) and the end-of-fit wait."""
    torch.set_num_threads(threads)
    from qwen_cls.checkpoint import QwenCheckpoint
    from qwen_cls.train import run_lightning_cli

    stalls: list[float] = []
    end = {"wait": 0.0}
    writes: list[tuple[float, float]] = []  # (wall, CPU seconds of the writing thread) per save
    save, train_end, write = (
        QwenCheckpoint._save_checkpoint,
        QwenCheckpoint.on_train_end,
        QwenCheckpoint._write,
    )

    def timed_save(self, trainer, filepath):
        started = time.perf_counter()
        save(self, trainer, filepath)
        stalls.append(time.perf_counter() - started)

    def timed_end(self, trainer, pl_module):
        started, saves = time.perf_counter(), len(stalls)
        train_end(self, trainer, pl_module)
        end["wait"] = time.perf_counter() - started - sum(stalls[saves:])

    def timed_write(self, *args):
        wall, cpu = time.perf_counter(), time.thread_time()
        write(self, *args)
        writes.append((time.perf_counter() - wall, time.thread_time() - cpu))

    QwenCheckpoint._save_checkpoint, QwenCheckpoint.on_train_end = timed_save, timed_end
    QwenCheckpoint._write = timed_write
    started = time.perf_counter()
    cli = run_lightning_cli(["fit", "--config", config_path])
    wall = time.perf_counter() - started
    if cli.trainer.is_global_zero:
        result = {"stalls": stalls, "end_wait": end["wait"], "fit_s": wall, "writes": writes}
        print("RESULT " + json.dumps(result))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(work: Path, base: dict, threads: int, name: str, **training) -> dict:
    config = json.loads(json.dumps(base))
    strategy = training.pop("strategy", None)
    if strategy:
        config["trainer"]["strategy"] = strategy
    config["training"].update(output_dir=str(work / name), **training)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(path), "--threads", str(threads)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    folders = sorted((work / name).glob("checkpoint-*"))
    result["run_bytes"] = sum(du(f) for f in folders)
    result["save_bytes"] = du(folders[0]) if folders else 0
    result["saves"] = len(folders)
    shutil.rmtree(work / name)
    return result


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def project(saves: int) -> list[str]:
    """Bytes per save and per run (``saves`` saves) at real scale: bf16 training, AdamW, ZeRO (any stage)."""
    lines = [
        f"| model | parameters | hf_model/ (bf16) | state | per save, every state | run of {saves} saves, every "
        f"state | run of {saves} saves, keep_state_last_n: 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, params in (("Qwen2.5-VL-3B", 3.75e9), ("Qwen2.5-VL-7B", 8.29e9), ("Qwen2.5-VL-72B", 73.4e9)):
        hf, state = 2 * params, 14 * params  # state: bf16 weights + fp32 master + two fp32 Adam moments
        lines.append(
            f"| {name} | {params / 1e9:.2f} B | {gb(hf)} | {gb(state)} | {gb(hf + state)} | "
            f"{gb(saves * (hf + state))} | {gb(saves * hf + state)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--work", default=None, help="where the runs write (default: a temporary folder)")
    args = parser.parse_args()
    if args.one:
        return one_run(args.one, args.threads)
    _, data = demo_inputs()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        params = make_model(work / "model", args.layers)
        base = {
            "model": {"pretrained_name": str(work / "model"), "num_labels": 10},
            "datasets": {"dataset_configs": {"mnist": {"num_classes": 10}}},
            "data": {"train_jsonl": str(data / "train.jsonl"), "val_jsonl": str(data / "val.jsonl"),
                     "batch_size": 2, "num_workers": 0},
            "training": {"max_steps": args.steps, "lr": 1e-5, "logging_steps": args.every, "save_steps": args.every,
                         "skip_evaluation": True, "disk_check": "off"},
            "monitor": {"plots": False},
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False},
        }  # fmt: skip
        print(
            f"model: {params / 1e6:.0f} M parameters, {args.steps} steps, a save every {args.every}; training on "
            f"{args.threads} of {os.cpu_count()} CPU threads"
        )
        runs = {
            "no mid-run saves": run(work, base, args.threads, "none", save_steps=10**6),
            "synchronous, every state": run(work, base, args.threads, "sync", background_save=False),
            "background, every state": run(work, base, args.threads, "background"),
            "background, keep_state_last_n: 1": run(work, base, args.threads, "newest", keep_state_last_n=1),
        }
        if find_spec("deepspeed"):
            runs["ZeRO-2 synchronous"] = run(
                work, base, args.threads, "z2sync", strategy="deepspeed_stage_2", background_save=False
            )
            runs["ZeRO-2 background"] = run(work, base, args.threads, "z2bg", strategy="deepspeed_stage_2")
    print("\n| run | saves | bytes per save | bytes of the run | training stall of each save (the last at the end "
          "of training) | end-of-fit wait | one write: wall / CPU (median) | fit wall time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        wall, cpu = (statistics.median(w[i] for w in r["writes"]) for i in (0, 1))
        print(
            f"| {name} | {r['saves']} | {gb(r['save_bytes'])} | {gb(r['run_bytes'])} | "
            f"{', '.join(f'{s:.2f}' for s in r['stalls'])} s | {r['end_wait']:.2f} s | {wall:.1f} s / {cpu:.1f} s | "
            f"{r['fit_s']:.1f} s |"
        )

    def stall(name: str) -> float:  # median over the saves during training
        return statistics.median(runs[name]["stalls"][:-1])

    print(
        f"\nmedian stall, background / synchronous: {stall('background, every state') / stall('synchronous, every state'):.2f} (goal <= 0.15)"
    )
    if "ZeRO-2 background" in runs:
        print(
            f"median stall, ZeRO-2 background / synchronous: {stall('ZeRO-2 background') / stall('ZeRO-2 synchronous'):.2f}"
        )
    none = runs["no mid-run saves"]["fit_s"]
    for name in ("synchronous, every state", "background, every state", "background, keep_state_last_n: 1"):
        print(f"fit wall time, {name} / no mid-run saves: {runs[name]['fit_s'] / none:.3f} (goal <= 1.10)")
    every, newest = (
        runs["background, every state"]["run_bytes"],
        runs["background, keep_state_last_n: 1"]["run_bytes"],
    )
    print(f"bytes of the run, keep_state_last_n: 1 / every state: {newest / every:.2f}\n")
    print("\n".join(project(60)))  # fmt: skip


if __name__ == "__main__":
    main()

"""Shared fixtures: the tiny Qwen2.5-VL and the MNIST demo data, built once per test session."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwen_cls.data import export_demo_data
from qwen_cls.tiny import make_tiny

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def row_cache(tmp_path_factory) -> Path:
    """Checked rows are cached here, not in the user's ~/.cache (children inherit the variable)."""
    path = tmp_path_factory.mktemp("row-cache")
    os.environ["QWEN_CLS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    return export_demo_data(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def val_subset(demo_data, tmp_path_factory) -> Path:
    """Every 5th validation row (all ten digits), with absolute image paths."""
    rows = [json.loads(line) for line in (demo_data / "val.jsonl").read_text().splitlines()[::5]]
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    path.write_text(
        "".join(json.dumps({**r, "image_path": str(demo_data / r["image_path"])}) + "\n" for r in rows)
    )
    return path


def base_config(tiny_model: Path, demo_data: Path, output_dir: Path) -> dict:
    """A small no-evaluation run on the demo data, as a user would write it."""
    return {
        "model": {"pretrained_name": str(tiny_model), "num_labels": 10},
        "loss": {"type": "cross_entropy"},
        "datasets": {"dataset_configs": {"mnist": {"num_classes": 10, "description": "handwritten digits"}}},
        "data": {
            "train_jsonl": str(demo_data / "train.jsonl"),
            "val_jsonl": str(demo_data / "val.jsonl"),
            "batch_size": 8,
            "num_workers": 0,
        },
        "training": {
            "epochs": 1,
            "max_steps": 12,
            "lr": 2e-3,
            "output_dir": str(output_dir),
            "logging_steps": 2,
            "save_steps": 5,
            "eval_steps": 3,
            "skip_evaluation": True,
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }


def write_config(path: Path, config: dict, **updates: dict) -> Path:
    """Write ``config`` with ``updates`` (section -> keys) merged in, as YAML."""
    config = copy.deepcopy(config)
    for section, values in updates.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def run_log(run: Path, name: str = "metrics.csv") -> Path:
    """The newest ``logs/version_N/<name>`` of a run (each start or resume writes its own version)."""
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] / name


# variables an in-process run of another test may have left; a child would reuse its port and ranks
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")


def child_env() -> dict[str, str]:
    """The environment for a multi-process child run."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def losses_by_step(run: Path) -> dict[int, float]:
    """``train/loss`` by optimizer step over every start of a run (a resume logs into its own version)."""
    losses = {}
    for log in sorted((run / "logs").glob("version_*/metrics.csv")):
        with log.open() as fh:
            losses.update(
                {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r["train/loss"]}
            )
    return losses


def start_qwen_cls(*args: str) -> subprocess.Popen:
    """`qwen-cls ARGS` as a separate, silent process (for runs a test watches or kills)."""
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_cls", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

"""The benchmarks' inputs: the tiny Qwen2.5-VL and the MNIST demo data under outputs/, built once."""

from __future__ import annotations

from pathlib import Path

from qwen_cls.data import export_demo_data
from qwen_cls.tiny import make_tiny


def demo_inputs() -> tuple[Path, Path]:
    model, data = Path("outputs/tiny-qwen2.5-vl"), Path("outputs/mnist")
    if not (model / "config.json").exists():
        make_tiny(model)
    if not (data / "val.jsonl").exists():
        export_demo_data(data)
    return model, data

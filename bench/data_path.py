"""The data path alone: decode + processor + collate, images/s out of the training DataLoader.

Compared with what training consumes (`qwen-cls fit` samples/s) it says whether the GPU would wait on data.
"""

from __future__ import annotations

import argparse
import time

from qwen_cls.config import DatasetConfig, DatasetsConfig
from qwen_cls.data import QwenDataModule


def data_path(model_dir: str, train_jsonl: str, batches: int, batch_size: int, num_workers: int) -> float:
    """Images/s delivered by the training DataLoader, after its first batch (worker start-up)."""
    dm = QwenDataModule(
        train_jsonl,
        batch_size=batch_size,
        num_workers=num_workers,
        processor_path=model_dir,
        datasets=DatasetsConfig({"mnist": DatasetConfig(num_classes=10)}),
    )
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="outputs/tiny-qwen2.5-vl")
    ap.add_argument("--train", default="outputs/mnist/train.jsonl")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--num_workers", type=int, default=0)
    args = ap.parse_args()
    print(
        f"{data_path(args.model, args.train, args.batches, args.batch_size, args.num_workers):.0f} images/s"
    )

"""A bare PyTorch training loop on the same tiny model, data, batch size and steps as `qwen-cls fit`.

The yardstick for framework overhead: what qwen-cls adds over `for batch in loader: step()`. With
``save_steps`` it also does the checkpointing a hand-written loop needs for the same job, written as such a
loop writes it (synchronously, in the training thread): every ``save_steps`` and at the end, the model and
processor with ``save_pretrained`` and the resumable state (model, optimizer, step) with ``torch.save``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qwen_cls.config import DatasetConfig, DatasetsConfig, LossConfig
from qwen_cls.data import QwenDataModule
from qwen_cls.loading import load_classifier
from qwen_cls.losses import classification_loss
from qwen_cls.modeling import MODEL_INPUTS


def save(model, optimizer, processor, step: int, out: Path) -> None:
    folder = out / f"checkpoint-{step}"
    model.save_pretrained(folder / "hf_model")
    processor.save_pretrained(folder / "hf_model")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    torch.save(state, folder / "state.pt")


def bare_loop(
    model_dir: str,
    train_jsonl: str,
    steps: int,
    batch_size: int,
    num_workers: int,
    lr: float,
    save_steps: int | None = None,
    output_dir: str | None = None,
) -> dict:
    torch.manual_seed(42)
    datasets = {"mnist": DatasetConfig(num_classes=10)}
    dm = QwenDataModule(
        train_jsonl,
        batch_size=batch_size,
        num_workers=num_workers,
        processor_path=model_dir,
        datasets=DatasetsConfig(datasets),
    )
    dm.setup("fit")
    model = load_classifier(model_dir, 10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_cfg = LossConfig()
    done, start = 0, None
    while done < steps:
        for batch in dm.train_dataloader():
            if done == 1:
                start = time.perf_counter(), time.process_time()  # exclude the first step (worker start-up)
            loss = classification_loss(
                model(**{k: batch[k] for k in MODEL_INPUTS}).logits, batch["labels"], loss_cfg
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:  # the clock stops before the last save, as fit's (bench/overhead.py StepTimer)
                seconds, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
            if save_steps and (done % save_steps == 0 or done == steps):
                save(model, opt, dm.processor, done, Path(output_dir))
            if done == steps:
                break
    return {
        "steps_per_second": (steps - 1) / seconds,
        "samples_per_second": (steps - 1) * batch_size / seconds,
        "cpu_seconds_per_step": cpu / (steps - 1),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="outputs/tiny-qwen2.5-vl")
    ap.add_argument("--train", default="outputs/mnist/train.jsonl")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--num_workers", type=int, default=1)
    ap.add_argument("--save_steps", type=int, default=None)
    ap.add_argument("--output_dir", default=None)
    args = ap.parse_args()
    print(
        bare_loop(
            args.model,
            args.train,
            args.steps,
            args.batch_size,
            args.num_workers,
            2e-3,
            args.save_steps,
            args.output_dir,
        )
    )

"""The peer on the same work: ms-swift's ``swift sft --task_type seq_cls`` (a Qwen2.5-VL with a linear head on
the last token, as ours), same tiny model folder, same images and labels in the same image size, batch, steps,
learning rate and schedule, gradient clipping, every weight trained in fp32, checkpoints every ``save_steps``
(weights, optimizer and scheduler state), no evaluation, data in the main process.

ms-swift pins older transformers and peft than qwen-cls (``ms-swift 4.6.0``: ``transformers<5.20``,
``peft<0.21``), so it lives in its own environment: ``make bench-peer`` builds ``.venv-swift`` (torch pins
first, as ours; DeepSpeed installed in both, as on a multi-GPU machine: transformers' ``save_pretrained``
imports it where it is installed, ~2 s at the first save of either). Without it the comparison is skipped and
the results say so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SWIFT_ENV = Path(".venv-swift")


def swift_command() -> list[str] | None:
    """``swift`` of ``.venv-swift`` (or ``$QWEN_CLS_SWIFT``), when it exists."""
    swift = Path(os.environ.get("QWEN_CLS_SWIFT", SWIFT_ENV / "bin" / "swift"))
    return [str(swift.resolve())] if swift.exists() else None


def swift_dataset(train_jsonl: Path, out: Path, prompt: str) -> Path:
    """Our rows as ms-swift's seq_cls rows: the image, our prompt, the label."""
    rows = []
    for line in train_jsonl.read_text().splitlines():
        row = json.loads(line)
        image = (train_jsonl.parent / row["image_path"]).resolve()
        messages = [{"role": "user", "content": f"<image>{prompt.format(dataset=row['dataset_name'])}"}]
        rows.append({"messages": messages, "images": [str(image)], "label": row["label"]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ms-swift's own defaults that make its work differ from ours (see swift_sft)
ITS_DEFAULTS = ["--freeze_vit", "true", "--freeze_aligner", "true", "--gradient_checkpointing", "true"]


def swift_sft(
    swift: list[str],
    model: Path,
    dataset: Path,
    out: Path,
    steps: int,
    batch_size: int,
    save_steps: int,
    lr: float,
) -> list[str]:
    """Later flags win: ``swift_sft(...) + ITS_DEFAULTS`` is the same command with ms-swift's defaults back."""
    return [*swift, "sft", "--model", str(model), "--model_type", "qwen2_5_vl", "--template", "qwen2_5_vl", "--use_hf", "true",
            "--task_type", "seq_cls", "--num_labels", "10", "--tuner_type", "full", "--torch_dtype", "float32",
            "--dataset", str(dataset), "--split_dataset_ratio", "0", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch_size), "--learning_rate", str(lr),
            "--max_grad_norm", "1.0", "--weight_decay", "0", "--warmup_ratio", "0", "--lr_scheduler_type", "cosine",
            "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", str(save_steps),
            "--save_total_limit", str(steps // save_steps + 1), "--logging_steps", "10",
            "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--report_to", "none",
            # the same work as ours: every weight trains (its multimodal default freezes the vision tower and
            # merger), no activation recomputation (its default recomputes), and no hub look-up of the local
            # model (``check_model``: a network call that only retries here)
            "--freeze_vit", "false", "--freeze_aligner", "false", "--gradient_checkpointing", "false",
            "--check_model", "false",
            "--output_dir", str(out), "--seed", "42"]  # fmt: skip


def swift_env(pixels: int) -> dict[str, str]:
    """Offline, and the images resized to the same area as our processor's (Qwen's MAX/MIN_PIXELS)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MODELSCOPE_OFFLINE": "1",
        "MAX_PIXELS": str(pixels),
        "MIN_PIXELS": str(pixels),
        "CUDA_VISIBLE_DEVICES": "",
    }

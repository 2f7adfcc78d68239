"""Evaluate a checkpoint folder on a JSONL file: top-1, top-5, loss and sample count, overall and per dataset.

It runs the LightningModule's own ``validation_step`` through ``Trainer.validate`` on the checkpoint's
``hf_model/``, so the numbers are computed by exactly the code that evaluates during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from rich.console import Console
from rich.table import Table

from qwen_cls.checkpoint import HF_DIR, INFO_FILE, list_checkpoints
from qwen_cls.config import DatasetConfig
from qwen_cls.data import QwenDataModule
from qwen_cls.errors import ConfigError
from qwen_cls.losses import LossConfig
from qwen_cls.model import QwenClassifier

DATA_KEYS = ("batch_size", "eval_batch_size", "num_workers", "min_pixels", "max_pixels", "prompt_template")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest complete one when given a run's output_dir."""
    path = Path(path)
    if (path / HF_DIR).is_dir():
        return path
    if path.is_dir():
        checkpoints = list_checkpoints(path)
        if checkpoints:
            print(f"[qwen-cls] evaluating the newest checkpoint of {path}: {checkpoints[-1].name}")
            return checkpoints[-1]
    raise ConfigError(
        f"--checkpoint_path: {path} is neither a checkpoint folder (with {HF_DIR}/) nor a run folder"
    )


def _load_config(checkpoint: Path, config_path: str | None) -> dict[str, Any]:
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config_path: {path} not found")
        return yaml.safe_load(path.read_text()) or {}
    info = checkpoint / INFO_FILE
    if not info.is_file():
        raise ConfigError(f"--checkpoint_path: {checkpoint} has no {INFO_FILE}; pass --config_path")
    return json.loads(info.read_text())["config"]


def _section(cfg: dict, name: str) -> dict:
    return dict(cfg.get(name) or {})


def build_eval_objects(
    checkpoint_path: str | Path,
    eval_data: str | list[str],
    config_path: str | None = None,
    batch_size: int | None = None,
) -> tuple[QwenClassifier, QwenDataModule]:
    """The module and data module that evaluate ``checkpoint_path`` on ``eval_data``, as training built them."""
    checkpoint = resolve_checkpoint(checkpoint_path)
    hf_dir = checkpoint / HF_DIR
    cfg = _load_config(checkpoint, config_path)
    model_cfg, data_cfg = _section(cfg, "model"), _section(cfg, "data")
    try:
        datasets = {
            k: DatasetConfig(**v) for k, v in _section(cfg, "datasets").get("dataset_configs", {}).items()
        }
        loss = LossConfig(**_section(cfg, "loss"))
    except TypeError as e:
        raise ConfigError(f"config: {e}") from None
    if "num_labels" not in model_cfg:
        raise ConfigError("model.num_labels: missing from the config")
    module = QwenClassifier(
        pretrained_name=str(hf_dir),
        num_labels=model_cfg["num_labels"],
        attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
        loss=loss,
        dataset_configs=datasets,
    )
    data_kwargs = {k: data_cfg[k] for k in DATA_KEYS if data_cfg.get(k) is not None}
    if batch_size:
        data_kwargs["eval_batch_size"] = batch_size
    datamodule = QwenDataModule(
        val_jsonl=eval_data, processor_path=str(hf_dir), dataset_configs=datasets, **data_kwargs
    )
    datamodule.full_eval = True
    return module, datamodule


def evaluate(
    checkpoint_path: str,
    eval_data: str,
    config_path: str | None = None,
    batch_size: int | None = None,
    output: str | None = None,
) -> dict[str, float]:
    """Evaluate one checkpoint and print a table.

    Args:
        checkpoint_path: a ``checkpoint-<step>`` folder (its ``hf_model/`` is evaluated), or a run's output_dir
            (its newest complete checkpoint).
        eval_data: JSONL file of image–label rows.
        config_path: the training YAML; default: the config stored in the checkpoint's training_info.json.
        batch_size: evaluation batch size (default: the config's).
        output: also write the metrics to this JSON file.
    """
    checkpoint = resolve_checkpoint(checkpoint_path)
    module, datamodule = build_eval_objects(checkpoint, eval_data, config_path, batch_size)
    trainer = L.Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {"checkpoint": str(checkpoint), "eval_data": str(eval_data), **module.last_eval_metrics}
    _print_table(metrics, module.dataset_names)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _print_table(metrics: dict[str, Any], dataset_names: list[str]) -> None:
    table = Table(title=f"{metrics['checkpoint']} on {metrics['eval_data']}")
    for column in ("dataset", "top-1", "top-5", "loss", "samples"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for name in ["overall", *dataset_names]:
        if f"{name}_samples" not in metrics:
            continue
        table.add_row(
            name,
            f"{metrics[f'{name}_accuracy']:.4f}",
            f"{metrics[f'{name}_top5_accuracy']:.4f}",
            f"{metrics[f'{name}_loss']:.4f}",
            str(metrics[f"{name}_samples"]),
        )
    Console().print(table)

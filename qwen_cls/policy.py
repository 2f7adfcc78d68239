"""The config resolver: one pure function from the parsed config to what the run really does.

``training.skip_evaluation: true`` has the highest priority. Whatever the YAML says, it forces the six
keys of ``SKIP_EVALUATION_FORCES`` and turns validation off in Lightning terms (``limit_val_batches=0``,
no sanity check) while every checkpoint is kept (``ModelCheckpoint(monitor=None, save_top_k=-1)``).
Every value it changes is reported, so the run can say which keys it overrode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_cls.errors import ConfigError

SKIP_EVALUATION_FORCES: dict[str, bool] = {
    "training.save_all_checkpoints": True,
    "best_model_tracking.enabled": False,
    "best_model_tracking.save_best_only": False,
    "evaluation.partial_eval_during_training": False,
    "evaluation.full_eval_at_end": False,
    "evaluation.eval_best_model_only": False,
}

# Lightning keys the user may have set under ``trainer:`` that no-evaluation mode also forces.
SKIP_EVALUATION_TRAINER = {"limit_val_batches": 0, "num_sanity_val_steps": 0}

NESTED_UNDER_TRAINING = ("evaluation", "best_model_tracking")


@dataclass(frozen=True)
class Override:
    key: str
    was: Any
    now: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.reason} overrides {self.key}: {_show(self.was)} -> {_show(self.now)}"


@dataclass(frozen=True)
class Resolution:
    """``config``: the resolved copy; ``trainer``: Lightning Trainer kwargs; ``checkpoint``: QwenCheckpoint
    kwargs (``keep_best_only``: keep the best checkpoint plus the latest, delete the rest; ``keep_all``: every
    checkpoint folder is kept, so only ``keep_state_last_n`` can save disk); ``overrides``:
    every value that was changed, in a stable order."""

    config: dict
    trainer: dict
    checkpoint: dict
    overrides: list[Override] = field(default_factory=list)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _get(cfg: dict, dotted: str) -> Any:
    section, key = dotted.split(".")
    return cfg.get(section, {}).get(key)


def _set(cfg: dict, dotted: str, value: Any) -> None:
    section, key = dotted.split(".")
    cfg.setdefault(section, {})[key] = value


def resolve(config: Mapping[str, Any]) -> Resolution:
    """Resolve a parsed config (plain nested dicts: ``training``, ``evaluation``, ``best_model_tracking``
    and optionally ``trainer``) without touching the input. Each value on its own was checked by its section's
    class (:mod:`qwen_cls.config`); what the resolver checks is how keys of different sections fit together."""
    cfg = copy.deepcopy(dict(config))
    training = cfg.setdefault("training", {})
    for section in NESTED_UNDER_TRAINING:
        nested = training.pop(section, None)
        if nested:
            cfg[section] = {**cfg.get(section, {}), **nested}

    user_trainer = cfg.get("trainer") or {}
    overrides: list[Override] = []

    def force(key: str, value: Any, reason: str) -> None:
        was = _get(cfg, key)
        if was != value:
            overrides.append(Override(key, was, value, reason))
        _set(cfg, key, value)

    save_steps = int(training.get("save_steps", 500))
    if training.get("skip_evaluation"):
        reason = "training.skip_evaluation=true"
        for key, value in SKIP_EVALUATION_FORCES.items():
            force(key, value, reason)
        force("training.keep_last_n", None, reason)  # "every checkpoint kept": retention is the resolver's
        for key, value in SKIP_EVALUATION_TRAINER.items():
            was = user_trainer.get(key)
            if was is not None and was != value:
                overrides.append(Override(f"trainer.{key}", was, value, reason))
        trainer = {**SKIP_EVALUATION_TRAINER, "val_check_interval": None}
        checkpoint = {"monitor": None, "save_top_k": -1, "every_n_train_steps": save_steps, "keep_all": True}
        return Resolution(cfg, trainer, checkpoint, overrides)

    partial = bool(_get(cfg, "evaluation.partial_eval_during_training"))
    if _get(cfg, "best_model_tracking.enabled") and not partial:
        force("best_model_tracking.enabled", False, "evaluation.partial_eval_during_training=false")
    if _get(cfg, "evaluation.eval_best_model_only") and not _get(cfg, "best_model_tracking.enabled"):
        force("evaluation.eval_best_model_only", False, "best_model_tracking.enabled=false")
    keep_all = bool(training.get("save_all_checkpoints"))
    if keep_all:
        if _get(cfg, "best_model_tracking.save_best_only"):
            force("best_model_tracking.save_best_only", False, "training.save_all_checkpoints=true")
        force("training.keep_last_n", None, "training.save_all_checkpoints=true")

    if partial:
        accumulate = int(user_trainer.get("accumulate_grad_batches") or 1)
        trainer = {
            "limit_val_batches": user_trainer.get("limit_val_batches", 1.0) or 1.0,
            "num_sanity_val_steps": user_trainer.get("num_sanity_val_steps"),
            "val_check_interval": int(training.get("eval_steps", 500)) * accumulate,
            "check_val_every_n_epoch": None,
        }
    else:
        trainer = {"limit_val_batches": 0, "num_sanity_val_steps": 0, "val_check_interval": None}

    checkpoint: dict[str, Any] = {
        "monitor": None,
        "save_top_k": -1,
        "every_n_train_steps": save_steps,
        "keep_all": keep_all,
    }
    if _get(cfg, "best_model_tracking.enabled"):
        metric, mode = _get(cfg, "best_model_tracking.metric"), _get(cfg, "best_model_tracking.mode")
        valid = best_metric_names(cfg.get("datasets", {}).get("dataset_configs") or {})
        if metric not in valid:
            raise ConfigError(
                f"best_model_tracking.metric: unknown metric {metric!r}; choose one of {', '.join(valid)}"
            )
        eval_steps = int(training.get("eval_steps", 500))
        if save_steps % eval_steps:
            raise ConfigError(
                f"training.save_steps: {save_steps} must be a multiple of training.eval_steps ({eval_steps}) when "
                "best_model_tracking is enabled, so that every checkpoint is ranked by an evaluation of its own weights"
            )
        keep_best_only = _get(cfg, "best_model_tracking.save_best_only") or not training.get(
            "save_all_checkpoints"
        )
        checkpoint.update(monitor=f"eval/{metric}", mode=mode, keep_best_only=bool(keep_best_only))
    return Resolution(cfg, trainer, checkpoint, overrides)


def best_metric_names(dataset_configs: Mapping[str, Any]) -> list[str]:
    """The metrics ``best_model_tracking.metric`` may name."""
    kinds = ("accuracy", "loss", "top5_accuracy", "macro_f1", "balanced_accuracy")
    return [f"{group}_{kind}" for group in ("overall", *dataset_configs) for kind in kinds]


# What a resume may not change: the data order of the interrupted epoch or the shapes in the saved state.
RESUME_FIXED = {
    "data.batch_size": "which rows each step trains on",
    "trainer.accumulate_grad_batches": "which rows each optimizer step trains on",
    "seed_everything": "the shuffled data order",
    "model.num_labels": "the head's shape",
    "loss.type": "the head (arcface trains a cosine head)",
    "datasets.dataset_configs": "the labels and the logits masking",
    "model.lora.enabled": "what trains and what the checkpoint holds",
    "model.lora.r": "the adapters' shapes",
    "model.lora.target_modules": "which projections carry adapters",
    "model.lora.vision": "which projections carry adapters",
    "model.lora.modules_to_save": "what trains in full",
}
_NOT_SETTINGS = ("config", "ckpt_path")


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if dotted in RESUME_FIXED or not isinstance(value, Mapping):
            flat[dotted] = value
        else:
            flat.update(_flatten(value, f"{dotted}."))
    return flat


def resume_changes(
    saved: Mapping[str, Any], now: Mapping[str, Any], saved_world: int | None, world: int
) -> tuple[list[str], list[str]]:
    """A checkpoint's recorded config against the resuming run's: the changes to refuse (each with why),
    and the others, to report. Both configs are resolved, JSON-like dicts."""
    old, new = _flatten(saved), _flatten(now)
    lora = old.get("model.lora.enabled") or new.get("model.lora.enabled")  # neither: no LoRA key matters
    refused, reported = [], []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in _NOT_SETTINGS or old.get(key) == new.get(key):
            continue
        if key.startswith("model.lora") and not lora:
            continue
        change = f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}"
        (refused if key in RESUME_FIXED else reported).append(
            f"{change} (it decides {RESUME_FIXED[key]})" if key in RESUME_FIXED else change
        )
    if saved_world is not None and saved_world != world:
        refused.append(
            f"trainer.devices x trainer.num_nodes: {saved_world} -> {world} processes (it decides which rows each "
            "process trains on, and how the optimizer state is sharded)"
        )
    return refused, reported

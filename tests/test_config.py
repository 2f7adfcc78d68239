"""The config sections check their own values (``__post_init__``) wherever they are built: in Python, from YAML or
the command line, and from a run's stored ``training_info.json`` (``RunConfig.from_mapping``)."""

from __future__ import annotations

import json

import pytest

from qwen_cls.config import (
    SECTIONS,
    BestModelTrackingConfig,
    DatasetsConfig,
    LoraSettings,
    LossConfig,
    MonitorConfig,
    RunConfig,
    TrainingConfig,
    WandbConfig,
)
from qwen_cls.errors import ConfigError
from tests.helpers import base_config, run_main, write_config

# (section class, its values, the one line), each value alone out of its range
BAD_VALUES = [
    (TrainingConfig, {"save_steps": 0}, "training.save_steps: must be >= 1, got 0"),
    (TrainingConfig, {"logging_steps": 0}, "training.logging_steps: must be >= 1, got 0"),
    (TrainingConfig, {"eval_steps": 0}, "training.eval_steps: must be >= 1, got 0"),
    (TrainingConfig, {"epochs": 0}, "training.epochs: must be >= 1, got 0"),
    (TrainingConfig, {"max_steps": 0}, "training.max_steps: 0 trains nothing"),
    (TrainingConfig, {"lr": 0.0}, "training.lr: must be > 0, got 0.0"),
    (TrainingConfig, {"warmup_steps": -1}, "training.warmup_steps: must be >= 0, got -1"),
    (TrainingConfig, {"weight_decay": -0.1}, "training.weight_decay: must be >= 0, got -0.1"),
    (TrainingConfig, {"max_grad_norm": -1.0}, "training.max_grad_norm: must be >= 0"),
    (TrainingConfig, {"keep_last_n": 0}, "training.keep_last_n: must be >= 1, got 0"),
    (TrainingConfig, {"keep_state_last_n": 0}, "training.keep_state_last_n: must be >= 1, got 0"),
    (
        DatasetsConfig,
        {"dataset_configs": {"food": {"num_classes": 0}}},
        "datasets.dataset_configs.food.num_classes: must be >= 1, got 0",
    ),
    (
        DatasetsConfig,
        {"dataset_configs": {"food": {"num_classes": 3, "eval_ratio": 1.5}}},
        "datasets.dataset_configs.food.eval_ratio: must be in (0, 1]",
    ),
    (
        DatasetsConfig,
        {"dataset_configs": {"food": {"num_classes": 3, "eval_ratio": 0}}},
        "datasets.dataset_configs.food.eval_ratio: must be in (0, 1]",
    ),
    (LossConfig, {"type": "hinge"}, "loss.type: unknown 'hinge'; choose one of cross_entropy"),
    (LossConfig, {"type": "symmetric_ce", "alpha": 0.0, "beta": 0.0}, "loss.alpha / loss.beta"),
    (LoraSettings, {"r": 0}, "model.lora.r: must be >= 1, got 0"),
    (LoraSettings, {"alpha": 0.0}, "model.lora.alpha: must be > 0, got 0.0"),
    (LoraSettings, {"dropout": 1.0}, "model.lora.dropout: must be in [0, 1), got 1.0"),
    (MonitorConfig, {"system_every_n_steps": 0}, "monitor.system_every_n_steps: must be >= 1, got 0"),
    (MonitorConfig, {"peak_tflops": -1.0}, "monitor.peak_tflops: must be > 0, got -1.0"),
    (WandbConfig, {"start_timeout": 0.0}, "wandb.start_timeout: must be > 0 seconds, got 0.0"),
    (BestModelTrackingConfig, {"mode": "up"}, "best_model_tracking.mode: must be max or min"),
]


@pytest.mark.parametrize("section,values,line", BAD_VALUES, ids=[r[2].split(":")[0] for r in BAD_VALUES])
def test_a_value_out_of_range_is_one_line_naming_the_key_in_python(section, values, line):
    with pytest.raises(ConfigError) as error:
        section(**values)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


@pytest.mark.parametrize("section", list(SECTIONS.values()) + [LoraSettings], ids=lambda c: c.__name__)
def test_every_default_is_valid(section):
    section()  # a section left out of the YAML is built from its defaults


def stored_config(tiny_model, demo_data, tmp_path) -> dict:
    """A config as training_info.json stores it (resolved, every section written out)."""
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["evaluation"] = {"full_eval_at_end": False}
    return json.loads(json.dumps(config))


def test_a_stored_config_reloads_through_the_section_classes(tiny_model, demo_data, tmp_path):
    run = RunConfig.from_mapping(stored_config(tiny_model, demo_data, tmp_path))
    assert (
        isinstance(run.training, TrainingConfig) and run.training.max_steps == 12 and run.training.lr == 2e-3
    )
    assert run.datasets.dataset_configs["mnist"].num_classes == 10
    assert run.loss == LossConfig("cross_entropy") and run.evaluation.full_eval_at_end is False
    assert run.wandb == WandbConfig() and run.model["num_labels"] == 10 and run.data["batch_size"] == 8


def test_a_stored_config_is_checked_like_a_new_one(tiny_model, demo_data, tmp_path):
    config = stored_config(tiny_model, demo_data, tmp_path)
    config["training"]["save_steps"] = 0
    with pytest.raises(ConfigError, match="training.save_steps: must be >= 1, got 0"):
        RunConfig.from_mapping(config, "run/checkpoint-5/training_info.json")
    config["training"]["save_steps"] = 5
    config["loss"]["kind"] = "focal"
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping(config, "run/checkpoint-5/training_info.json")
    assert (
        str(error.value) == "loss.kind: not a key of the loss: section (run/checkpoint-5/training_info.json)"
    )


def test_a_config_stored_with_copies_of_the_sections_reads_as_today(tiny_model, demo_data, tmp_path):
    """Runs saved before the sections were handed whole stored linked copies under model: and data:."""
    config = stored_config(tiny_model, demo_data, tmp_path)
    config["model"].update(
        lr=2e-3, loss={"type": "cross_entropy"}, dataset_configs={}, on_nonfinite_loss="error"
    )
    config["data"]["dataset_configs"] = {}
    run = RunConfig.from_mapping(config)
    assert set(run.model) == {"pretrained_name", "num_labels"} and "dataset_configs" not in run.data


@pytest.mark.parametrize(
    "args,line",
    [
        (["--training.save_steps", "0"], "training.save_steps: must be >= 1, got 0"),
        (["--model.lora.r", "0"], "model.lora.r: must be >= 1, got 0"),  # a section inside a union
        (["--loss.temperature", "0"], "loss.temperature: must be > 0, got 0.0"),
    ],
)
def test_a_value_out_of_range_is_one_line_on_the_command_line(
    tiny_model, demo_data, tmp_path, capsys, args, line
):
    config = write_config(tmp_path / "c.yaml", base_config(tiny_model, demo_data, tmp_path / "run"))
    code, _, err = run_main(capsys, "fit", "--config", str(config), *args)
    assert code == 2 and err.strip().splitlines()[-1] == f"qwen-cls: error: {line}"
    assert not (tmp_path / "run").exists()  # refused before anything was written

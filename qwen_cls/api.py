"""The Python API: the CLI's commands as functions, for notebooks and scripts.

``fit`` runs the very LightningCLI and resolver that ``qwen-cls fit`` runs (no second code path), with
the same dotted keys as overrides; it never parses ``sys.argv`` and returns instead of exiting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from qwen_cls.commands import evaluate, report
from qwen_cls.commands import evaluate_all as _evaluate_all
from qwen_cls.console import quiet_library_chatter
from qwen_cls.errors import ConfigError
from qwen_cls.model import QwenClassifier
from qwen_cls.run_dir import list_checkpoints

__all__ = ["FitResult", "evaluate", "evaluate_all", "fit", "report"]

quiet_library_chatter()


class FitResult(NamedTuple):
    """What ``fit`` returns: unpack it as ``model, run_dir = qwen_cls.fit(...)``."""

    model: QwenClassifier
    run_dir: Path

    @property
    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.run_dir)


def _flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1e-4}}`` and ``{"training.lr": 1e-4}`` -> ``{"training.lr": 1e-4}``; a mapping
    under a key that takes one (``datasets.dataset_configs``) is kept whole when it is given dotted."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and "." not in key and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cli_args(config: str | Path | dict | None, overrides: dict[str, Any]) -> list[str]:
    """The ``qwen-cls fit`` arguments for a config (a YAML path or a dict) and overrides."""
    args = ["fit"]
    if isinstance(config, dict):
        args.append(f"--config={yaml.safe_dump(config)}")
    elif config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config: {config} not found")
        args.append(f"--config={config}")
    for key, value in _flatten(overrides).items():  # strings as typed; numbers, lists, dicts as JSON
        args.append(f"--{key}={value if isinstance(value, str | Path) else json.dumps(value)}")
    return args


def fit(config: str | Path | dict | None = None, **overrides: Any) -> FitResult:
    """Train as ``qwen-cls fit --config CONFIG --key value ...`` does.

    Args:
        config: a YAML file, or the same content as a dict.
        overrides: dotted keys as on the command line (``**{"training.lr": 1e-4}``) or nested dicts
            (``training={"lr": 1e-4}``).
    """
    from qwen_cls.train import run_lightning_cli

    args = cli_args(config, overrides)
    argv, sys.argv = sys.argv, sys.argv[:1]  # a Jupyter kernel's own arguments are not ours
    try:
        cli = run_lightning_cli(args, exit_on_error=False)
    finally:
        sys.argv = argv
    return FitResult(cli.model, Path(cli.config.fit.training.output_dir))


def evaluate_all(run_dir: str | Path, eval_data: str | Path, **kwargs: Any) -> list[dict[str, Any]]:
    """``qwen-cls evaluate-all RUN_DIR --eval_data FILE``: one dict per checkpoint, in step order (keyword
    arguments as :func:`qwen_cls.commands.evaluate_all`)."""
    return _evaluate_all(str(run_dir), eval_data=str(eval_data), **kwargs)

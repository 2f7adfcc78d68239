"""The Python API: the CLI's commands as functions, for notebooks and scripts.

``fit`` runs the very parser, resolver and hooks that ``qwen-cls fit`` runs (:func:`qwen_cls.train.fit`), from
a config given as a YAML file or a mapping, with the same dotted keys as overrides; it never parses
``sys.argv`` and raises instead of exiting. The tools are :mod:`qwen_cls.commands`'.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from qwen_cls.commands import evaluate, report
from qwen_cls.commands import evaluate_all as _evaluate_all
from qwen_cls.run_dir import list_checkpoints

if TYPE_CHECKING:
    from qwen_cls.model import QwenClassifier

__all__ = ["FitResult", "evaluate", "evaluate_all", "fit", "report"]


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


def with_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each dotted key of ``overrides`` set, as ``--key value`` sets it."""
    config = copy.deepcopy(config)
    for dotted, value in _flatten(overrides).items():
        *sections, key = dotted.split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = str(value) if isinstance(value, Path) else value
    return config


def fit(config: str | Path | dict | None = None, **overrides: Any) -> FitResult:
    """Train as ``qwen-cls fit --config CONFIG --key value ...`` does.

    Args:
        config: a YAML file, or the same content as a dict.
        overrides: dotted keys as on the command line (``**{"training.lr": 1e-4}``) or nested dicts
            (``training={"lr": 1e-4}``).
    """
    from qwen_cls.train import fit as train_fit
    from qwen_cls.train import load_config_file

    if config is None:
        base = {}
    elif isinstance(config, dict):
        base = config
    else:
        base = load_config_file(config, key="config")
    return train_fit(with_overrides(base, overrides))


def evaluate_all(run_dir: str | Path, eval_data: str | Path, **kwargs: Any) -> list[dict[str, Any]]:
    """``qwen-cls evaluate-all RUN_DIR --eval_data FILE``: one dict per checkpoint, in step order (keyword
    arguments as :func:`qwen_cls.commands.evaluate_all`)."""
    return _evaluate_all(str(run_dir), eval_data=str(eval_data), **kwargs)

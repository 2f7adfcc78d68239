"""qwen-cls: fine-tune Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) as image classifiers with PyTorch
Lightning.

Importing the package imports nothing heavy (the command line answers ``--help`` at once). The names below load
their module on first use: the classifier (:mod:`qwen_cls.modeling`, torch and transformers only; importing it
registers the classifier with transformers' Auto classes), the trainer (``QwenClassifier``) and the Python API
(``fit``, ``evaluate``, ``evaluate_all``, ``Predictor``, ``report``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "QwenVLClassifierConfig": "qwen_cls.modeling",
    "QwenVLForImageClassification": "qwen_cls.modeling",
    "QwenClassifier": "qwen_cls.model",
    "fit": "qwen_cls.api",
    "FitResult": "qwen_cls.api",
    "evaluate": "qwen_cls.commands",
    "evaluate_all": "qwen_cls.api",
    "report": "qwen_cls.commands",
    "Predictor": "qwen_cls.predict",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen_cls' has no attribute {name!r}")

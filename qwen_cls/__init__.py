"""qwen-cls: fine-tune Qwen2.5-VL as an image classifier with PyTorch Lightning.

Importing the package imports :mod:`qwen_cls.modeling` only (torch and transformers), which registers the
classifier with transformers' Auto classes; the trainer (``QwenClassifier``) and the Python API (``fit``,
``evaluate``, ``evaluate_all``, ``Predictor``, ``report``) load Lightning on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from qwen_cls.modeling import QwenVLClassifierConfig, QwenVLForImageClassification

__version__ = "0.1.0"

_EXPORTS = {
    "QwenClassifier": "qwen_cls.model",
    "fit": "qwen_cls.api",
    "FitResult": "qwen_cls.api",
    "evaluate": "qwen_cls.api",
    "evaluate_all": "qwen_cls.api",
    "report": "qwen_cls.api",
    "Predictor": "qwen_cls.predict",
}
__all__ = ["QwenClassifier", "QwenVLClassifierConfig", "QwenVLForImageClassification", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen_cls' has no attribute {name!r}")

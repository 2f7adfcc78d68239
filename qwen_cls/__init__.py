"""qwen-cls: fine-tune Qwen2.5-VL as an image classifier with PyTorch Lightning.

The Python API (``fit``, ``evaluate``, ``evaluate_all``, ``Predictor``, ``report``) is imported on first
use, so ``import qwen_cls`` stays quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "qwen_cls.api",
    "FitResult": "qwen_cls.api",
    "evaluate": "qwen_cls.api",
    "evaluate_all": "qwen_cls.api",
    "report": "qwen_cls.api",
    "Predictor": "qwen_cls.predict",
    "QwenClassifier": "qwen_cls.model",
    "QwenVLClassifierConfig": "qwen_cls.model",
    "QwenVLForImageClassification": "qwen_cls.model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen_cls' has no attribute {name!r}")

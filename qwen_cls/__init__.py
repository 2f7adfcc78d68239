"""qwen-cls: fine-tune Qwen2.5-VL as an image classifier with PyTorch Lightning."""

from qwen_cls.model import QwenClassifier, QwenVLClassifierConfig, QwenVLForImageClassification

__all__ = ["QwenClassifier", "QwenVLClassifierConfig", "QwenVLForImageClassification"]
__version__ = "0.1.0"

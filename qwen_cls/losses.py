"""Classification losses, computed in fp32 whatever the model's dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen_cls.errors import ConfigError

LOSS_TYPES = ("cross_entropy", "label_smoothing")


@dataclass
class LossConfig:
    """The ``loss:`` section.

    Args:
        type: one of ``cross_entropy`` or ``label_smoothing``.
        smoothing: label-smoothing mass spread over the other classes (``label_smoothing`` only), in [0, 1).
        temperature: logits are divided by it before the softmax (> 0).
    """

    type: str = "cross_entropy"
    smoothing: float = 0.1
    temperature: float = 1.0


def validate_loss_config(cfg: LossConfig) -> None:
    if cfg.type not in LOSS_TYPES:
        raise ConfigError(f"loss.type: unknown loss {cfg.type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= cfg.smoothing < 1.0:
        raise ConfigError(f"loss.smoothing: must be in [0, 1), got {cfg.smoothing}")
    if cfg.temperature <= 0:
        raise ConfigError(f"loss.temperature: must be > 0, got {cfg.temperature}")


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, reduction: str = "mean"
) -> torch.Tensor:
    """Loss of a batch (``reduction="none"``: one per sample); ``logits`` are raw head outputs."""
    logits = logits.float() / cfg.temperature
    smoothing = cfg.smoothing if cfg.type == "label_smoothing" else 0.0
    return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction=reduction)

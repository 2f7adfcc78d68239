"""Classification losses, computed in fp32 whatever the model's dtype, aware of per-row valid classes.

Several datasets share one head of ``num_labels`` columns, their labels local to each dataset. With
logits masking each row only competes over its own dataset's classes: ``valid`` marks them, masked
columns get probability zero, and label smoothing spreads its mass over the valid columns only (spread
over all columns, it puts mass on zero-probability classes: an infinite loss).
"""

from __future__ import annotations

import math

import torch

from qwen_cls.config import LossConfig

RCE_LOG_ZERO = math.log(1e-4)  # symmetric CE's reverse term clamps the one-hot target at 1e-4


def mask_logits(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Columns outside a row's dataset get -inf: zero probability, never predicted."""
    return logits if valid is None else logits.masked_fill(~valid, float("-inf"))


def head_for(loss_type: str) -> str:
    """The head a loss trains: ArcFace a cosine head (``scale * cos``), the others a linear one."""
    return "cosine" if loss_type == "arcface" else "linear"


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
    training: bool = True,
) -> torch.Tensor:
    """Loss of a batch (``reduction="none"``: one value per row).

    ``logits`` are the head's outputs (for ``arcface`` the scaled cosines the cosine head produces);
    ``valid`` is a (batch, classes) bool mask of each row's classes, or None for all.
    """
    logits = logits.float()
    if cfg.type == "arcface" and training:
        logits = _arcface_margin(logits, labels, cfg)
    logits = mask_logits(logits / cfg.temperature, valid)
    log_p = torch.log_softmax(logits, dim=-1)
    nll = -log_p.gather(1, labels[:, None]).squeeze(1)
    if cfg.type == "label_smoothing":
        # mean of -log p over the valid classes only (masked columns would contribute -inf)
        n_valid = valid.sum(-1) if valid is not None else torch.full_like(nll, logits.shape[-1])
        spread = (-log_p).masked_fill(torch.isinf(log_p), 0.0).sum(-1) / n_valid
        loss = (1 - cfg.smoothing) * nll + cfg.smoothing * spread
    elif cfg.type == "focal":
        p_true = torch.exp(-nll)
        loss = cfg.alpha * (1 - p_true).pow(cfg.gamma) * nll
    elif cfg.type == "symmetric_ce":
        p_true = torch.exp(-nll)
        reverse = -RCE_LOG_ZERO * (1 - p_true)  # -sum_k p_k log(clamp(onehot_k, 1e-4))
        loss = cfg.alpha * nll + cfg.beta * reverse
    else:  # cross_entropy, arcface
        loss = nll
    return loss.mean() if reduction == "mean" else loss


def _arcface_margin(scaled_cos: torch.Tensor, labels: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Replace each row's target logit s*cos(theta) by s*cos(theta + m)."""
    cos = (scaled_cos / cfg.scale).clamp(-1 + 1e-7, 1 - 1e-7)
    target = cos.gather(1, labels[:, None])
    with_margin = torch.cos(torch.acos(target) + cfg.margin)
    return (cos.scatter(1, labels[:, None], with_margin)) * cfg.scale

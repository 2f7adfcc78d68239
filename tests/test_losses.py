"""Every loss against hand-computed values; masking of other datasets' classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_cls.config import LOSS_TYPES, DatasetConfig, DatasetsConfig, LossConfig
from qwen_cls.errors import ConfigError
from qwen_cls.losses import classification_loss, mask_logits
from qwen_cls.model import QwenClassifier

LOGITS = [2.0, 0.5, -1.0]
LABEL = 0


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def run(cfg: LossConfig, logits=LOGITS, label=LABEL, valid=None, training=True):
    x = torch.tensor([logits], requires_grad=True)
    mask = None if valid is None else torch.tensor([valid])
    loss = classification_loss(x, torch.tensor([label]), cfg, mask, training=training)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    return loss.item()


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_cross_entropy(t):
    p = softmax([v / t for v in LOGITS])
    assert run(LossConfig("cross_entropy", temperature=t)) == pytest.approx(-math.log(p[0]), abs=1e-6)


def test_label_smoothing_spreads_over_the_valid_classes_only():
    eps = 0.2
    p = softmax(LOGITS)
    expected = (1 - eps) * -math.log(p[0]) + eps * sum(-math.log(q) for q in p) / 3
    assert run(LossConfig("label_smoothing", smoothing=eps)) == pytest.approx(expected, abs=1e-6)
    # two more columns that belong to another dataset: masked, they change nothing
    masked = run(
        LossConfig("label_smoothing", smoothing=eps), LOGITS + [9.0, 7.0], valid=[True] * 3 + [False] * 2
    )
    assert masked == pytest.approx(expected, abs=1e-6)


def test_focal():
    gamma, alpha, t = 2.0, 0.25, 1.5
    p = softmax([v / t for v in LOGITS])[0]
    expected = alpha * (1 - p) ** gamma * -math.log(p)
    assert run(LossConfig("focal", gamma=gamma, alpha=alpha, temperature=t)) == pytest.approx(
        expected, abs=1e-6
    )
    assert run(LossConfig("focal", gamma=0.0, alpha=1.0)) == pytest.approx(run(LossConfig("cross_entropy")))


def test_symmetric_cross_entropy():
    alpha, beta = 0.1, 1.0
    p = softmax(LOGITS)
    reverse = -sum(q * math.log(1.0 if k == LABEL else 1e-4) for k, q in enumerate(p))
    expected = alpha * -math.log(p[0]) + beta * reverse
    assert run(LossConfig("symmetric_ce", alpha=alpha, beta=beta)) == pytest.approx(expected, abs=1e-5)


def test_arcface_margin_in_training_only():
    scale, margin = 10.0, 0.3
    cosines = [0.6, 0.2, -0.4]
    logits = [scale * c for c in cosines]
    with_margin = [scale * math.cos(math.acos(0.6) + margin)] + logits[1:]
    cfg = LossConfig("arcface", margin=margin, scale=scale)
    assert run(cfg, logits) == pytest.approx(-math.log(softmax(with_margin)[0]), abs=1e-5)
    assert run(cfg, logits, training=False) == pytest.approx(-math.log(softmax(logits)[0]), abs=1e-5)


def test_losses_are_fp32_whatever_the_input_dtype():
    logits = torch.tensor([LOGITS], dtype=torch.bfloat16)
    for name in LOSS_TYPES:
        loss = classification_loss(logits, torch.tensor([0]), LossConfig(name))
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name


@pytest.mark.parametrize(
    "values,key",
    [
        (dict(type="label_smoothing", smoothing=1.0), "loss.smoothing"),
        (dict(type="focal", gamma=-1.0), "loss.gamma"),
        (dict(type="focal", alpha=0.0), "loss.alpha"),
        (dict(type="symmetric_ce", beta=-1.0), "loss.beta"),
        (dict(type="arcface", margin=2.0), "loss.margin"),
        (dict(type="arcface", scale=0.0), "loss.scale"),
        (dict(type="cross_entropy", temperature=0.0), "loss.temperature"),
    ],
)
def test_bad_loss_parameters_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        LossConfig(**values)


def test_label_smoothing_and_temperature_match_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    label = torch.tensor([0])
    t, eps = 2.0, 0.3
    z = [2.0 / t, 0.0, -1.0 / t]
    log_z = math.log(sum(math.exp(v) for v in z))
    log_p = [v - log_z for v in z]
    expected = -((1 - eps) * log_p[0] + eps * sum(log_p) / 3)
    loss = classification_loss(logits, label, LossConfig("label_smoothing", smoothing=eps, temperature=t))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    plain = classification_loss(logits.detach().half(), label, LossConfig("cross_entropy", temperature=1.0))
    assert plain.dtype == torch.float32  # computed in fp32 whatever the model dtype
    assert plain.item() == pytest.approx(F.cross_entropy(logits.detach(), label).item(), abs=1e-3)


def test_two_datasets_of_10_and_3_classes_share_one_head_without_infinite_loss():
    module = QwenClassifier(
        "unused",
        num_labels=10,
        datasets=DatasetsConfig({"digits": DatasetConfig(10), "mod3": DatasetConfig(3)}),
    )
    dataset_idx = torch.tensor([0, 1, 1, 1])
    valid = module.valid_classes(dataset_idx)
    assert valid.sum(-1).tolist() == [10, 3, 3, 3]
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    logits[1:, 5] = 50.0  # the head prefers a class that mod3 rows do not have
    labels = torch.tensor([7, 0, 1, 2])
    for name in LOSS_TYPES:
        loss = classification_loss(logits, labels, LossConfig(name, scale=10.0), valid)
        assert torch.isfinite(loss), name
    predictions = mask_logits(logits, valid).argmax(-1)
    assert predictions[0] == logits[0].argmax() and (predictions[1:] < 3).all()
    unmasked = QwenClassifier(
        "unused",
        10,
        datasets=DatasetsConfig(
            {"digits": DatasetConfig(10), "mod3": DatasetConfig(3)}, enable_logits_masking=False
        ),
    )
    assert unmasked.valid_classes(dataset_idx) is None

"""The trained classifier as a Hugging Face model: what ``hf_model/`` holds, usable without the trainer.

``QwenVLForImageClassification`` is the vision-language backbone without its LM head (the 150k-column
vocabulary projection is never computed), the hidden state of each sample's last non-padding token, and a
linear (or cosine) head. It is a plain ``PreTrainedModel``: ``from_pretrained`` alone loads it, and so does
``AutoModelForImageClassification`` once this module is imported (``import qwen_cls`` imports it).

Imports torch and transformers only: serving a trained model needs neither Lightning nor anything else of
the training side.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, Qwen2_5_VLConfig, Qwen2_5_VLModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

from qwen_cls.config import COSINE_SCALE

MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


@strict
class QwenVLClassifierConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL plus the head: ``linear`` (logits = W h, + b with ``classifier_bias``) or ``cosine`` (logits =
    scale * cos(h, W), the head ArcFace trains). ``classifier_bias`` defaults to true for configs saved before
    the key existed (their heads have a bias); new heads are bias-free unless ``model.head_bias`` asks, which is
    what vLLM serves (and transformers' own ``*ForSequenceClassification`` heads are)."""

    model_type = "qwen2_5_vl_classifier"
    classifier_head: str = "linear"
    cosine_scale: float = COSINE_SCALE
    classifier_bias: bool = True


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's last attended position; right for left and right padding alike."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.to(positions.dtype) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class QwenVLForImageClassification(Qwen2_5_VLPreTrainedModel):
    config_class = QwenVLClassifierConfig

    def __init__(self, config: QwenVLClassifierConfig, backbone: Qwen2_5_VLModel | None = None):
        super().__init__(config)
        self.model = backbone if backbone is not None else Qwen2_5_VLModel(config)
        bias = config.classifier_head != "cosine" and config.classifier_bias
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels, bias=bias)
        self.post_init()

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.config.classifier_head == "cosine":
            weight = nn.functional.normalize(self.score.weight, dim=-1)
            return self.config.cosine_scale * nn.functional.normalize(pooled, dim=-1) @ weight.T
        return self.score(pooled)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        mm_token_type_ids: torch.IntTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention:
        """Logits over all ``num_labels`` columns. With ``labels``, ``loss`` is a plain cross-entropy over every
        column (as transformers' classifiers give): not the run's ``loss:`` section, its temperature or the
        per-dataset logits masking, which live in the trainer (:func:`qwen_cls.losses.classification_loss`)."""
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        logits = self.head(pool_last_token(hidden, attention_mask))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


def label_maps(id2label: dict[int, str]) -> dict[str, dict]:
    """A config's ``id2label`` and its inverse ``label2id``."""
    return {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


def classifier_config(
    backbone_config: Qwen2_5_VLConfig,
    num_labels: int,
    classifier_head: str = "linear",
    cosine_scale: float = QwenVLClassifierConfig.cosine_scale,
    bias: bool = False,
    id2label: dict[int, str] | None = None,
) -> QwenVLClassifierConfig:
    """The classifier's config: the backbone's, plus the head and its labels (``id2label``: the column names;
    default the column numbers)."""
    labels = label_maps(id2label or {i: str(i) for i in range(num_labels)})
    skip = {
        "model_type",
        "architectures",
        "num_labels",
        "classifier_head",
        "cosine_scale",
        "classifier_bias",
        *labels,
    }
    return QwenVLClassifierConfig(
        **{k: v for k, v in backbone_config.to_dict().items() if k not in skip},
        num_labels=num_labels,
        classifier_head=classifier_head,
        cosine_scale=cosine_scale,
        classifier_bias=bias,
        **labels,
    )


AutoConfig.register(QwenVLClassifierConfig.model_type, QwenVLClassifierConfig)
AutoModelForImageClassification.register(QwenVLClassifierConfig, QwenVLForImageClassification)

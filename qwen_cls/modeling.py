"""The trained classifier as a Hugging Face model: what ``hf_model/`` holds, usable without the trainer.

``QwenVLForImageClassification`` is a Qwen-VL backbone (any family of :mod:`qwen_cls.families`) without its LM
head (the 150k-column vocabulary projection is never computed), the hidden state of each sample's last
non-padding token, and a linear (or cosine) head. Each family has its own classes (``Qwen3VLForImageClassification``
over transformers' ``Qwen3VLModel``, config ``model_type`` ``qwen3_vl_classifier``, ...), so ``hf_model/`` records
the backbone it holds; ``QwenVLForImageClassification.from_pretrained`` and ``AutoModelForImageClassification``
load any of them (``import qwen_cls`` registers them).

Imports torch and transformers only: serving a trained model needs neither Lightning nor anything else of
the training side.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import transformers
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from qwen_cls.config import COSINE_SCALE
from qwen_cls.families import FAMILIES, Family, family_of

MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")

CLASSIFIER_DOC = """{title} plus the head: ``linear`` (logits = W h, + b with ``classifier_bias``) or ``cosine`` (logits =
    scale * cos(h, W), the head ArcFace trains). ``classifier_bias`` defaults to true for configs saved before
    the key existed (their heads have a bias); new heads are bias-free unless ``model.head_bias`` asks, which is
    what vLLM serves (and transformers' own ``*ForSequenceClassification`` heads are)."""


def _classifier_config_class(family: Family) -> type[PreTrainedConfig]:
    base = getattr(transformers, f"{family.prefix}Config")
    namespace = {
        "__module__": __name__,
        "__doc__": CLASSIFIER_DOC.format(title=family.title),
        "__annotations__": {"classifier_head": str, "cosine_scale": float, "classifier_bias": bool},
        "model_type": family.classifier_type,
        "classifier_head": "linear",
        "cosine_scale": COSINE_SCALE,
        "classifier_bias": True,
    }
    return strict(type(f"{family.prefix}ClassifierConfig", (base,), namespace))


CLASSIFIER_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    name: _classifier_config_class(family) for name, family in FAMILIES.items()
}
QwenVLClassifierConfig = CLASSIFIER_CONFIGS["qwen2_5_vl"]  # the first family's name, kept for saved code


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's last attended position; right for left and right padding alike."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.to(positions.dtype) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class QwenVLForImageClassification(nn.Module):
    """The classifier over any family's backbone (the family classes below derive from it and from the family's
    ``PreTrainedModel``). Called on this class, ``QwenVLForImageClassification(config)`` and ``.from_pretrained``
    build the family the config names, so code written for one family serves all."""

    backbone_class: type[nn.Module]
    _backbone_args: frozenset[str] = frozenset()

    def __new__(cls, *args, **kwargs):
        if (
            cls is QwenVLForImageClassification
        ):  # (copy and pickle call __new__ with no arguments, on a family)
            cls = classifier_class(args[0].model_type if args else kwargs["config"].model_type)
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        target = cls
        if cls is QwenVLForImageClassification:
            config = kwargs.get("config")
            saved = (
                config.model_type if config is not None else saved_model_type(pretrained_model_name_or_path)
            )
            target = classifier_class(saved)
        return super(QwenVLForImageClassification, target).from_pretrained(
            pretrained_model_name_or_path, *args, **kwargs
        )

    def __init__(self, config: PreTrainedConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        self.model = backbone if backbone is not None else self.backbone_class(config)
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
        if "use_cache" in self._backbone_args:
            kwargs["use_cache"] = False  # no KV cache: one forward pass per image
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            **kwargs,
        ).last_hidden_state
        logits = self.head(pool_last_token(hidden, attention_mask))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


def _classifier_model_class(family: Family) -> type[QwenVLForImageClassification]:
    backbone = getattr(transformers, f"{family.prefix}Model")
    pretrained = getattr(transformers, f"{family.prefix}PreTrainedModel")
    namespace = {
        "__module__": __name__,
        "__doc__": f"{family.title} without its LM head, last-token pooling and the classification head.",
        "config_class": CLASSIFIER_CONFIGS[family.model_type],
        "backbone_class": backbone,
        "_backbone_args": frozenset(inspect.signature(backbone.forward).parameters),
    }
    return type(
        f"{family.prefix}ForImageClassification", (QwenVLForImageClassification, pretrained), namespace
    )


CLASSIFIERS: dict[str, type[QwenVLForImageClassification]] = {
    name: _classifier_model_class(family) for name, family in FAMILIES.items()
}


def classifier_class(model_type: str) -> type[QwenVLForImageClassification]:
    """The classifier class of a family, from a base model's or a classifier's ``model_type``."""
    return CLASSIFIERS[family_of(model_type).model_type]


def saved_model_type(path: str | Path) -> str:
    """The ``model_type`` in a folder's ``config.json`` (empty when there is none)."""
    config_file = Path(path) / "config.json"
    return json.loads(config_file.read_text()).get("model_type", "") if config_file.is_file() else ""


def label_maps(id2label: dict[int, str]) -> dict[str, dict]:
    """A config's ``id2label`` and its inverse ``label2id``."""
    return {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


def classifier_config(
    backbone_config: PreTrainedConfig,
    num_labels: int,
    classifier_head: str = "linear",
    cosine_scale: float = COSINE_SCALE,
    bias: bool = False,
    id2label: dict[int, str] | None = None,
) -> PreTrainedConfig:
    """The classifier's config (of the backbone's family): the backbone's, plus the head and its labels (``id2label``: the column names;
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
    config_class = CLASSIFIER_CONFIGS[family_of(backbone_config.model_type).model_type]
    return config_class(
        **{k: v for k, v in backbone_config.to_dict().items() if k not in skip},
        num_labels=num_labels,
        classifier_head=classifier_head,
        cosine_scale=cosine_scale,
        classifier_bias=bias,
        **labels,
    )


for _name, _config in CLASSIFIER_CONFIGS.items():
    AutoConfig.register(_config.model_type, _config)
    AutoModelForImageClassification.register(_config, CLASSIFIERS[_name])

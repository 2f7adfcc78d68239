"""The Qwen-VL family members qwen-cls fine-tunes, and what differs between them.

A model folder's own ``config.json`` (its ``model_type``) chooses the family; everything else (the classifier,
loading, ZeRO-3, LoRA targets, FLOPs, export) reads the family from here, so one YAML serves them all with only
``model.pretrained_name`` changed. Light: no transformers import (the classes are named, looked up when used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwen_cls.errors import ConfigError

CLASSIFIER_SUFFIX = "_classifier"


@dataclass(frozen=True)
class Family:
    """One family member: its ``model_type``, transformers' class prefix, and the facts training depends on.

    ``vision``: the vision tower's kind (FLOPs): Qwen2-VL (full attention, fc1/fc2 MLP, 14 px patches), Qwen2.5-VL
    (windowed attention, gated MLP), Qwen3-VL (full attention, 16 px patches, learned position grid, DeepStack
    mergers feeding early LM layers). The language model: ``moe`` (routed experts with fused weights, Qwen3.5's
    with a gated shared expert) and ``linear_attention`` (Qwen3.5: Gated-DeltaNet layers beside gated full
    attention). LoRA targets name the projections that are ``nn.Linear`` (fused MoE experts are not; attention,
    a shared expert and any dense MLP are adapted)."""

    model_type: str
    title: str
    prefix: str  # transformers' class names: {prefix}Config, {prefix}Model, {prefix}ForConditionalGeneration
    processor: str  # transformers' processor class the tiny model saves
    vision: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
    moe: bool
    linear_attention: bool
    vision_projections: tuple[str, ...]

    @property
    def classifier_type(self) -> str:
        return self.model_type + CLASSIFIER_SUFFIX

    @property
    def vllm_architecture(self) -> str:
        """The name vLLM serves this family's sequence classifier under (its ``*ForConditionalGeneration`` with
        a pooling head)."""
        return f"{self.prefix}ForSequenceClassification"

    @property
    def vllm_serves(self) -> bool:
        """Whether vLLM (0.32, checked) serves the family as an image classifier: for Qwen3.5 its
        ``*ForSequenceClassification`` resolves to the text-only model, which has no vision tower."""
        return not self.linear_attention

    @property
    def vllm_head(self) -> str:
        """The head weight's name in vLLM's model: Qwen2/2.5-VL's pooling head sits in its language model."""
        return "language_model.score.weight" if self.vision in ("qwen2_vl", "qwen2_5_vl") else "score.weight"

    @property
    def lm_projections(self) -> tuple[str, ...]:
        attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # an MoE's dense (mlp_only) layers
        if self.moe:
            mlp += ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
        if self.linear_attention:
            attention += ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj")
        return (*attention, *mlp)  # an MoE's routed experts are fused 3-D weights, no nn.Linear


_QWEN2_VISION = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_QWEN25_VISION = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QWEN3_VISION = ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "qwen2_vl", "Qwen2-VL", "Qwen2VL", "Qwen2VLProcessor", "qwen2_vl", False, False, _QWEN2_VISION,
        ),
        Family(
            "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VL", "Qwen2_5_VLProcessor", "qwen2_5_vl", False, False, _QWEN25_VISION,
        ),
        Family(
            "qwen3_vl", "Qwen3-VL", "Qwen3VL", "Qwen3VLProcessor", "qwen3_vl", False, False, _QWEN3_VISION,
        ),
        Family(
            "qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoe", "Qwen3VLProcessor", "qwen3_vl", True, False, _QWEN3_VISION,
        ),
        Family(
            "qwen3_5", "Qwen3.5", "Qwen3_5", "Qwen3VLProcessor", "qwen3_vl", False, True, _QWEN3_VISION,
        ),
        Family(
            "qwen3_5_moe", "Qwen3.5-MoE", "Qwen3_5Moe", "Qwen3VLProcessor", "qwen3_vl", True, True, _QWEN3_VISION,
        ),
    )
}  # fmt: skip
DEFAULT_FAMILY = "qwen2_5_vl"


def supported() -> str:
    return ", ".join(f"{f.title} ({f.model_type})" for f in FAMILIES.values())


def family_of(model_type: str, where: str = "model.pretrained_name") -> Family:
    """The family of a base model's or a saved classifier's ``model_type``; one line naming the supported ones
    for anything else."""
    family = FAMILIES.get(model_type.removesuffix(CLASSIFIER_SUFFIX))
    if family is None:
        raise ConfigError(
            f"{where} holds a {model_type or 'unknown'!r} model; qwen-cls fine-tunes {supported()}"
        )
    return family


def is_classifier(model_type: str) -> bool:
    """Whether a ``model_type`` is a classifier saved by qwen-cls (an ``hf_model/``)."""
    return model_type.endswith(CLASSIFIER_SUFFIX) and model_type.removesuffix(CLASSIFIER_SUFFIX) in FAMILIES

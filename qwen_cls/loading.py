"""Loading a model folder into the classifier: what a folder must hold, which attention and dtype it loads in,
the classifier from a Qwen-VL checkpoint of any supported family (a new head) or from a saved ``hf_model/`` (its
head, or a new one).
No Lightning: the LightningModule (:mod:`qwen_cls.model`), evaluation and export call it.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers import logging as hf_logging

from qwen_cls.config import COSINE_SCALE
from qwen_cls.errors import CheckpointError, ConfigError
from qwen_cls.families import family_of, is_classifier, supported
from qwen_cls.modeling import QwenVLForImageClassification, classifier_class, classifier_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def training_dtype(precision: str) -> str:
    """The dtype the module's weights had while training (DeepSpeed casts the module for 16-bit runs)."""
    return (
        "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"
    )


def save_dtype(choice: str, precision: str) -> torch.dtype | None:
    """``training.save_dtype`` for ``hf_model/``: ``auto`` is bfloat16 for a bf16 run, else the weights' own
    dtype (None)."""
    if choice == "auto":
        return torch.bfloat16 if precision.startswith("bf16") else None
    return DTYPES[choice]


def qwen_model_type(path: str | Path) -> str:
    """A loadable folder's ``model_type``: a supported family's base model (``qwen3_vl``) or a classifier saved by
    qwen-cls (``qwen3_vl_classifier``); anything else is a config error naming the supported families."""
    config_file = Path(path) / "config.json"
    if not Path(path).exists():
        hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)) is not None
        raise ConfigError(
            f"model.pretrained_name: {path} is not a folder here"
            + (
                "; it looks like a hub id: models are loaded from local folders only (download it first, e.g. "
                f"`hf download {path} --local-dir DIR`, and give DIR)"
                if hub_id
                else ""
            )
        )
    if not config_file.is_file():
        raise ConfigError(
            f"model.pretrained_name: {path} has no config.json; expected a model folder of {supported()}"
        )
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    family_of(model_type, f"model.pretrained_name: {path}")
    return model_type


def check_weight_files(path: Path) -> None:
    """The weights a folder's loader will look for are all there: a partial copy or download (no weights, or an
    index naming shards that are missing) is one line, not transformers' traceback."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text()).get("weight_map", {}).values()))
            missing = [name for name in shards if not (path / name).is_file()]
            if missing:
                raise ConfigError(
                    f"model.pretrained_name: {path} lacks {len(missing)} of the {len(shards)} weight files its {index} "
                    f"names ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the copy or download "
                    "is incomplete"
                )
            return
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ConfigError(
            f"model.pretrained_name: {path} holds no weights (*.safetensors or pytorch_model*.bin); the copy or "
            "download is incomplete"
        )


def check_processor_files(path: Path) -> None:
    """A Qwen-VL processor needs the tokenizer's files and the image processor's settings; without them
    transformers builds a processor that fails at the first batch (or a config error much later)."""
    tokenizer = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    image = (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()
    missing = [
        what
        for what, there in (
            ("the tokenizer (tokenizer.json, or vocab.json + merges.txt)", tokenizer),
            ("the image processor (preprocessor_config.json or processor_config.json)", image),
        )
        if not there
    ]
    if missing:
        raise ConfigError(
            f"model.pretrained_name: {path} lacks {' and '.join(missing)}; copy the whole model folder (the "
            "processor is loaded from it)"
        )


Attention = Literal["auto", "flash_attention_2", "sdpa", "eager"]


TorchDtype = Literal["auto", "float32", "bfloat16", "float16"]


def choose_attention(
    requested: Attention, cuda_capability: tuple[int, int] | None, flash_installed: bool
) -> str:
    """``auto``: FlashAttention-2 where the ``flash_attn`` package imports and the GPU is Ampere or newer
    (compute capability 8.0+), else PyTorch's SDPA, else eager. An explicit choice that cannot run is an
    error rather than a silent switch."""
    flash_ok = flash_installed and cuda_capability is not None and cuda_capability >= (8, 0)
    if requested == "flash_attention_2" and not flash_ok:
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package and an Ampere or newer "
            "GPU; use auto or sdpa"
        )
    if requested != "auto":
        return requested
    if flash_ok:
        return "flash_attention_2"
    return "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"


def load_classifier(
    pretrained_name: str,
    num_labels: int,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    classifier_head: str = "linear",
    cosine_scale: float = COSINE_SCALE,
    reinit_head: bool = False,
    bias: bool = False,
) -> QwenVLForImageClassification:
    """A classifier from a local folder: either a saved ``hf_model/`` (backbone and head; with ``reinit_head`` a
    new head for a new label set on its backbone) or a checkpoint of any supported family (Qwen2.5-VL-7B,
    Qwen3-VL-8B, ... or a tiny one), whose LM head is dropped and a new head added (``bias``: a linear head with
    a bias). The folder's ``config.json`` chooses the family's classes."""
    path = Path(pretrained_name)
    model_type = qwen_model_type(path)
    check_weight_files(path)
    model_class = classifier_class(model_type)
    if is_classifier(model_type):
        saved = model_class.config_class.from_pretrained(path)
        if reinit_head:
            config = classifier_config(saved, num_labels, classifier_head, cosine_scale, bias)
            return _new_head_on(path, config, dtype, attn_implementation)
        if saved.num_labels != num_labels:
            raise ConfigError(
                f"model.num_labels: {num_labels}, but the classifier in {path} has {saved.num_labels} labels; set "
                "model.reinit_head: true to train a new head for the new labels on its backbone"
            )
        if saved.classifier_head != classifier_head:
            raise ConfigError(
                f"loss.type: needs a {classifier_head} head, but the classifier in {path} has a "
                f"{saved.classifier_head} head (arcface trains a cosine head; the other losses a linear one); set "
                "model.reinit_head: true to train a new head on its backbone"
            )
        return model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    head_seed = int(torch.randint(0, 2**31 - 1, ()))  # before loading, whose path may draw from the RNG
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the LM head is "unexpected" by design; missing keys are checked below
    try:
        backbone, info = model_class.backbone_class.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ConfigError(
            f"model.pretrained_name: {path} lacks {len(missing)} backbone weights, e.g. {missing[:3]}"
        )
    config = classifier_config(backbone.config, num_labels, classifier_head, cosine_scale, bias)
    model = model_class(config, backbone=backbone)
    init_head(model.score, config, head_seed)
    if not hasattr(model.score.weight, "ds_id"):  # a ZeRO-3 partition: DeepSpeed owns its dtype
        model.score.to(dtype)
    return model


def _new_head_on(
    path: Path, config: PreTrainedConfig, dtype: torch.dtype, attn_implementation: str
) -> QwenVLForImageClassification:
    """A trained classifier's backbone with a new, seeded head (transformers' ``ignore_mismatched_sizes``)."""
    head_seed = int(torch.randint(0, 2**31 - 1, ()))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the old head's weights are left out by design
    try:
        model = classifier_class(config.model_type).from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    init_head(model.score, config, head_seed)
    if not hasattr(model.score.weight, "ds_id"):
        model.score.to(dtype)
    return model


def init_head(score: nn.Linear, config: PreTrainedConfig, seed: int) -> None:
    """A new head, N(0, initializer_range) with zero bias as transformers initialises a Linear, from its own
    seeded generator: the same head whether the backbone was loaded whole or into ZeRO-3 partitions (which
    draw differently from the global RNG, and whose post_init saw empty placeholders)."""
    std = getattr(config, "initializer_range", None) or config.get_text_config().initializer_range or 0.02
    partitioned = hasattr(score.weight, "ds_id")
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(score.parameters()), modifier_rank=0)
    with gathered if partitioned else contextlib.nullcontext(), torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        score.weight.copy_(torch.randn(score.weight.shape, generator=generator) * std)
        if score.bias is not None:
            score.bias.zero_()


def load_dtype(name: str, precision: str | None) -> torch.dtype:
    """``model.torch_dtype`` as loaded: ``auto`` follows ``trainer.precision`` (16-bit weights only for the
    ``*-true`` precisions; mixed precision keeps fp32 weights, which DeepSpeed may cast itself)."""
    if name == "auto":
        name = {"bf16-true": "bfloat16", "16-true": "float16"}.get(str(precision), "float32")
    return DTYPES[name]


@contextlib.contextmanager
def refuse_unsafe_checkpoint(what: str):
    """torch.load(weights_only=True) refuses a checkpoint holding arbitrary objects; say so in one line."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what} cannot be loaded safely: {str(e).splitlines()[0]}") from None

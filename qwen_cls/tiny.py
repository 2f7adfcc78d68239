"""A tiny, randomly initialised Qwen-VL model of any supported family, built offline.

No model can be downloaded on our development and CI machines, so tests and the demo build a small
model from a config and save it the way a real checkpoint is saved (weights, config, processor,
tokenizer). Training then loads it with the same ``from_pretrained`` call a 7B checkpoint goes through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLVideoProcessor,
)

from qwen_cls.console import quiet_library_chatter
from qwen_cls.errors import ConfigError
from qwen_cls.families import DEFAULT_FAMILY, FAMILIES

PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}  # pixels, by vision tower

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's own chat template, trimmed to what a classification prompt uses (text and images).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the byte-level BPE is trained on: enough for the prompts and dataset names we use to be a few
# tokens each, so sequences stay short on CPU. Any text still tokenizes (byte fallback).
_CORPUS = [
    "You are a helpful assistant.",
    "system user assistant",
    "Which class of the dataset is this image? Answer with the class.",
    "What is shown in this image? Classify it.",
    "mnist digits handwritten digit zero one two three four five six seven eight nine",
    "food101 food2k food dish cifar10 cifar object animal vehicle dataset",
    "0 1 2 3 4 5 6 7 8 9 10 100 101 2000",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's special tokens, trained deterministically on a tiny corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int | None = None, family: str = DEFAULT_FAMILY
):
    """The family's processor with images resized to ``image_size``² pixels: by default a 4×4 patch grid (56 px
    at Qwen2/2.5-VL's 14 px patches, 64 px at Qwen3-VL's 16 px) → 4 visual tokens after the 2×2 merge."""
    import transformers

    patch = PATCH_SIZE[FAMILIES[family].vision]
    pixels = (image_size or 4 * patch) ** 2
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch)
    video = Qwen2VLVideoProcessor() if patch == 14 else Qwen3VLVideoProcessor(patch_size=patch)
    return getattr(transformers, FAMILIES[family].processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


def qwen_vl_config(
    tokenizer: PreTrainedTokenizerFast, text: dict, vision: dict, family: str = DEFAULT_FAMILY
) -> PreTrainedConfig:
    """A config of the family with the ``text`` and ``vision`` dimensions given, this tokenizer's vocabulary and
    special token ids, and the family's patching (14 px patches for Qwen2/2.5-VL, 16 px after; 2x2 merge)."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    kind = FAMILIES[family].vision
    patching = {"patch_size": PATCH_SIZE[kind], "spatial_merge_size": 2, "temporal_patch_size": 2}
    if kind == "qwen2_5_vl":
        patching["window_size"] = 112
    return getattr(transformers, f"{FAMILIES[family].prefix}Config")(
        text_config={
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            **text,
        },
        vision_config={**patching, **vision},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    layers: int = 2,
    head_dim: int = 16,
    family: str = DEFAULT_FAMILY,
) -> PreTrainedConfig:
    """``head_dim`` 16 by default (4 heads of 64); vLLM's CPU attention takes 64 (2 heads of 128). Each family
    keeps its own traits at this size: Qwen3-VL's DeepStack (one visual level fed to the first LM layer) and
    learned position grid, the MoE's routed experts (2 of 4 per token), Qwen3.5's linear-attention layer beside
    a full-attention one."""
    heads = hidden_size // head_dim
    if heads < 1 or heads * head_dim != hidden_size or head_dim % 8:
        raise ValueError(f"head_dim: {head_dim} must divide hidden_size {hidden_size} and be a multiple of 8")
    kind = FAMILIES[family]
    # M-RoPE splits the rotated half of each head into time, height, width sections
    rotary = (
        head_dim // 4 if kind.linear_attention else head_dim // 2
    )  # Qwen3.5 rotates a quarter of each head
    time = rotary // 4
    mrope = {"mrope_section": [time, (rotary - time) // 2, (rotary - time) // 2]}
    text = {
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "intermediate_size": 2 * hidden_size,
    }
    vision = {"depth": 2, "hidden_size": hidden_size, "num_heads": heads}
    if kind.vision == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", **mrope}
        vision = {**vision, "embed_dim": hidden_size, "mlp_ratio": 2}  # hidden_size: the merger's output
    elif kind.vision == "qwen2_5_vl":
        text["rope_scaling"] = {"type": "mrope", **mrope}
        vision.update(
            out_hidden_size=hidden_size, intermediate_size=2 * hidden_size, fullatt_block_indexes=[1]
        )
    else:
        text.update(head_dim=head_dim)
        text["rope_parameters"] = {"rope_type": "default", "mrope_interleaved": True, **mrope}
        vision.update(
            out_hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_position_embeddings=64
        )
        if not kind.linear_attention:
            vision["deepstack_visual_indexes"] = [0]
    if kind.moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size)
        if kind.linear_attention:  # Qwen3.5's: every layer routed, beside a gated shared expert
            del text["intermediate_size"]
            text["shared_expert_intermediate_size"] = hidden_size
        else:
            text["decoder_sparse_step"] = 1
    if kind.linear_attention:
        text["rope_parameters"]["partial_rotary_factor"] = 0.5
        text.update(
            layer_types=["linear_attention", "full_attention"] * (layers // 2)
            + ["full_attention"] * (layers % 2),
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
            linear_num_key_heads=max(1, heads // 2),
            linear_num_value_heads=heads,
        )
    return qwen_vl_config(tokenizer, text, vision, family)


def make_tiny(
    output_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    head_dim: int = 16,
    family: str = DEFAULT_FAMILY,
) -> Path:
    """Write a random tiny model of the family (weights with the LM head, config, processor, tokenizer) to
    ``output_dir``, as the hub's checkpoints are laid out."""
    import transformers

    if family not in FAMILIES:
        raise ConfigError(f"--family: {family!r} is not one of {', '.join(FAMILIES)}")
    quiet_library_chatter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, family=family)
    torch.manual_seed(seed)
    config = tiny_config(tokenizer, hidden_size, layers, head_dim, family)
    model = getattr(transformers, f"{FAMILIES[family].prefix}ForConditionalGeneration")(config)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir

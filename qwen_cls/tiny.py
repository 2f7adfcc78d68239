"""A tiny, randomly initialised Qwen2.5-VL built offline.

No model can be downloaded on our development and CI machines, so tests and the demo build a small
Qwen2.5-VL from a config and save it the way a real checkpoint is saved (weights, config, processor,
tokenizer). Training then loads it with the same ``from_pretrained`` call a 7B checkpoint goes through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from qwen_cls.console import quiet_library_chatter

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


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 56) -> Qwen2_5_VLProcessor:
    """Images are resized to ``image_size``² pixels: 56² → a 4×4 patch grid → 4 visual tokens."""
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def qwen_vl_config(tokenizer: PreTrainedTokenizerFast, text: dict, vision: dict) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the ``text`` and ``vision`` dimensions given, with this tokenizer's vocabulary
    and special token ids and Qwen2.5-VL's patching (14 px patches, 2x2 merge)."""
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            **text,
        },
        vision_config={
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            **vision,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2, head_dim: int = 16
) -> Qwen2_5_VLConfig:
    """``head_dim`` 16 by default (4 heads of 64); vLLM's CPU attention takes 64 (2 heads of 128)."""
    heads = hidden_size // head_dim
    if heads < 1 or heads * head_dim != hidden_size or head_dim % 8:
        raise ValueError(f"head_dim: {head_dim} must divide hidden_size {hidden_size} and be a multiple of 8")
    rotary = (
        head_dim // 2
    )  # M-RoPE splits the rotary half into time, height, width sections, as Qwen2.5-VL does
    time = rotary // 4
    text = {
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "intermediate_size": 2 * hidden_size,
        "rope_scaling": {
            "type": "mrope",
            "mrope_section": [time, (rotary - time) // 2, (rotary - time) // 2],
        },
    }
    vision = {
        "depth": 2,
        "hidden_size": hidden_size,
        "out_hidden_size": hidden_size,
        "num_heads": heads,
        "intermediate_size": 2 * hidden_size,
        "fullatt_block_indexes": [1],
    }
    return qwen_vl_config(tokenizer, text, vision)


def make_tiny(
    output_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2, head_dim: int = 16
) -> Path:
    """Write a random tiny Qwen2.5-VL (model, config, processor, tokenizer) to ``output_dir``."""
    quiet_library_chatter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, hidden_size, layers, head_dim))
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir

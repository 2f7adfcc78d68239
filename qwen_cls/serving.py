"""``qwen-cls export --format vllm``: a checkpoint's ``hf_model/`` as a folder vLLM serves as it is.

vLLM (0.32) serves a Qwen-VL sequence classifier with ``runner="pooling"``: the family's architecture
(``Qwen2_5_VLForSequenceClassification``, ``Qwen3VLForSequenceClassification``, ...: its generation model with a
pooling head), its base model type (``qwen2_5_vl``), last-token pooling (as ours), the head's weight under the
name that model loads it by (``language_model.score.weight`` for Qwen2/2.5-VL, ``score.weight`` from Qwen3-VL on)
and no bias. The export writes that config (the run's class names as
``id2label``), the weights under vLLM's names, the processor the run trained with (its pixel bounds, so a client
that sends only an image gets the training-time resize) and ``serving.json``: each dataset's chat-templated prompt,
its columns and names, which a client of a multi-dataset model uses to mask the other datasets' columns.

The weights are never loaded: each safetensors file is copied with its header rewritten where the head's name
changes (the tensors' bytes are streamed, so a 72B export holds no weights in host memory). A head vLLM would
compute differently is refused, never exported: ArcFace's cosine head, or a linear head with a bias.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from qwen_cls.config import RunConfig
from qwen_cls.errors import ConfigError
from qwen_cls.families import family_of
from qwen_cls.run_dir import HF_DIR, INFO_FILE, check_new_folder, read_info, written_whole

HEAD = "score.weight"  # ours
SERVING_FILE = "serving.json"
_CLASSIFIER_KEYS = ("classifier_head", "cosine_scale", "classifier_bias")
_COPY_CHUNK = 64 << 20


def check_servable(hf_config: dict[str, Any], run: RunConfig, where: Path) -> None:
    """One line for a head vLLM cannot compute as qwen-cls does."""
    if hf_config.get("classifier_head", "linear") == "cosine":
        raise ConfigError(
            f"loss.type: {run.loss.type} trained a cosine head (scale * cos(h, W)) in {where}, which vLLM cannot "
            "serve (it applies a plain linear head); serve it with qwen-cls predict, or train with another loss"
        )
    if hf_config.get("classifier_bias", True):
        raise ConfigError(
            f"model.head_bias: the head in {where} has a bias, which vLLM cannot load (it serves bias-free heads); "
            "serve it with qwen-cls predict, or train with model.head_bias: false (the default)"
        )


def vllm_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Our classifier's config as vLLM reads the family's sequence classifier's. An MoE's router renormalises
    its top-k weights in transformers (always, without a key); vLLM 0.32 reads that from ``norm_topk_prob``."""
    family = family_of(hf_config.get("model_type", ""), "hf_model/config.json")
    if not family.vllm_serves:
        raise ConfigError(
            f"--format vllm: vLLM 0.32 does not serve {family.title} as an image classifier (its "
            "sequence-classification path loads the text-only model, without the vision tower); serve it with "
            "qwen-cls predict, or export --format hf"
        )
    config = {k: v for k, v in hf_config.items() if k not in _CLASSIFIER_KEYS}
    config.update(
        architectures=[family.vllm_architecture],
        model_type=family.model_type,
        num_labels=len(config["id2label"]),
    )
    if family.moe:
        config["text_config"] = {**config["text_config"], "norm_topk_prob": True}
    return config


def serving_info(run: RunConfig, hf_dir: Path, num_labels: int) -> dict[str, Any]:
    """What a client needs besides the image: each dataset's prompt and columns."""
    from transformers import AutoProcessor

    from qwen_cls.data import DEFAULT_PROMPT, chat_prompt

    processor = AutoProcessor.from_pretrained(hf_dir)
    template = run.data.get("prompt_template") or DEFAULT_PROMPT
    datasets = []
    for name, dataset in run.datasets.dataset_configs.items():
        datasets.append(
            {
                "name": name,
                "question": template.format(dataset=name, description=dataset.description or name),
                "prompt": chat_prompt(processor, template, name, dataset.description),
                "columns": [0, dataset.num_classes],
                "class_names": run.datasets.names(name),
            }
        )
    size = dict(
        getattr(processor.image_processor, "size", None) or {}
    )  # the pixel bounds (see load_processor)
    masking = run.datasets.enable_logits_masking and min(run.datasets.num_classes) < num_labels
    return {
        "num_labels": num_labels,
        "logits_masking": masking,
        "datasets": datasets,
        "min_pixels": size.get("shortest_edge"),
        "max_pixels": size.get("longest_edge"),
        "usage": "one image per request, with its dataset's prompt (offline: `prompt`; /classify: a user message "
        "of the image and `question`, add_generation_prompt true); with logits_masking keep the probabilities of "
        "the dataset's columns [start, end) and divide by their sum: what qwen-cls predict computes",
    }


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def rewrite_tensors(
    source: Path, target: Path, names: dict[str, str], transposed: tuple[str, ...] = ()
) -> bool:
    """``source`` (a safetensors file) written to ``target`` with tensors renamed by ``names`` and the 3-D
    tensors whose names end with one of ``transposed`` stored with their last two axes swapped (same bytes, so
    every offset stays); the header is rewritten and the bytes streamed, one transposed tensor in memory at a
    time. A file with nothing to change is hard-linked (copied across file systems). Returns whether the file
    holds one of the names."""
    with source.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        held = names.keys() & header.keys()
        swap = sorted(
            (header[k]["data_offsets"][0], k)
            for k in header
            if k != "__metadata__" and k.endswith(transposed) and len(header[k]["shape"]) == 3
        ) if transposed else []  # fmt: skip
        if any(names[name] != name for name in held) or swap:
            renamed = {names.get(key, key): value for key, value in header.items()}
            for _, key in swap:
                e, rows, cols = header[key]["shape"]
                renamed[names.get(key, key)] = {**header[key], "shape": [e, cols, rows]}
            data = json.dumps(renamed, separators=(",", ":")).encode()
            data += b" " * (-len(data) % 8)  # the tensor data stays 8-byte aligned, as safetensors writes it
            with target.open("wb") as out:
                out.write(struct.pack("<Q", len(data)))
                out.write(data)
                at = 0  # offsets are relative to the data: unchanged
                for start, key in swap:
                    _copy_bytes(fh, out, start - at)
                    end = header[key]["data_offsets"][1]
                    out.write(_transposed_bytes(fh.read(end - start), header[key]))
                    at = end
                shutil.copyfileobj(fh, out, _COPY_CHUNK)
            return bool(held)
    _link_or_copy(source, target)
    return bool(held)


def _copy_bytes(fh, out, count: int) -> None:
    while count > 0:
        chunk = fh.read(min(count, _COPY_CHUNK))
        out.write(chunk)
        count -= len(chunk)


def _transposed_bytes(raw: bytes, entry: dict[str, Any]) -> bytes:
    import torch

    dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype).view(entry["shape"])
    return tensor.transpose(1, 2).contiguous().view(torch.uint8).numpy().tobytes()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def export_vllm(checkpoint: Path, output: str | None) -> Path:
    """The folder ``vllm serve OUTPUT --runner pooling`` loads (see the module's docstring)."""
    if not output:
        raise ConfigError("--output: give the folder to write the vLLM model into (--format vllm)")
    target = Path(output)
    check_new_folder(target)
    info_file, hf_dir = checkpoint / INFO_FILE, checkpoint / HF_DIR
    if not info_file.is_file() or not (hf_dir / "config.json").is_file():
        raise ConfigError(
            f"--checkpoint_path: {checkpoint} is not a complete checkpoint folder (with {INFO_FILE} and {HF_DIR}/ "
            "or DeepSpeed shards)"
        )
    run = RunConfig.from_mapping(read_info(checkpoint).config, str(info_file))
    hf_config = json.loads((hf_dir / "config.json").read_text())
    check_servable(hf_config, run, hf_dir)
    config = vllm_config(hf_config)
    family = family_of(hf_config["model_type"])
    names = {HEAD: family.vllm_head}
    # vLLM reads fused experts in the released checkpoints' layout, (experts, in, out): transformers keeps
    # (experts, out, in) and saves it so
    transposed = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj") if family.moe else ()
    with written_whole(target) as tmp:
        held = False
        for path in sorted(hf_dir.iterdir()):
            if path.suffix == ".safetensors":
                held |= rewrite_tensors(path, tmp / path.name, names, transposed)
            elif path.name.endswith(".safetensors.index.json"):
                index = json.loads(path.read_text())
                index["weight_map"] = {names.get(k, k): v for k, v in index["weight_map"].items()}
                (tmp / path.name).write_text(json.dumps(index, indent=2) + "\n")
            elif path.is_file() and path.name != "config.json":
                shutil.copyfile(path, tmp / path.name)
        if not held:
            raise ConfigError(f"--checkpoint_path: {hf_dir} holds no head weight (score.weight)")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        serving = serving_info(run, hf_dir, config["num_labels"])
        (tmp / SERVING_FILE).write_text(json.dumps(serving, indent=2, ensure_ascii=False) + "\n")
    return target

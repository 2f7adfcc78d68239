"""``qwen-cls export --format vllm``: a checkpoint's ``hf_model/`` as a folder vLLM serves as it is.

vLLM (0.32) serves a Qwen2.5-VL sequence classifier with ``runner="pooling"``: architecture
``Qwen2_5_VLForSequenceClassification``, model type ``qwen2_5_vl``, last-token pooling (as ours), the head's
weight named ``language_model.score.weight`` and no bias. The export writes that config (the run's class names as
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
from qwen_cls.run_dir import HF_DIR, INFO_FILE, check_new_folder, read_info, written_whole

ARCHITECTURE = "Qwen2_5_VLForSequenceClassification"
MODEL_TYPE = "qwen2_5_vl"
HEAD_NAMES = {"score.weight": "language_model.score.weight"}  # ours -> vLLM's
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
    """Our classifier's config as vLLM reads a Qwen2.5-VL sequence classifier's."""
    config = {k: v for k, v in hf_config.items() if k not in _CLASSIFIER_KEYS}
    config.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, num_labels=len(config["id2label"]))
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


def rename_tensors(source: Path, target: Path, names: dict[str, str]) -> bool:
    """``source`` (a safetensors file) written to ``target`` with tensors renamed by ``names``; the header is
    rewritten and the tensor bytes streamed. A file with none of the names is hard-linked (copied across file
    systems). Returns whether a name was changed."""
    with source.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        if names.keys() & header.keys():
            renamed = {names.get(key, key): value for key, value in header.items()}
            data = json.dumps(renamed, separators=(",", ":")).encode()
            data += b" " * (-len(data) % 8)  # the tensor data stays 8-byte aligned, as safetensors writes it
            with target.open("wb") as out:
                out.write(struct.pack("<Q", len(data)))
                out.write(data)
                shutil.copyfileobj(fh, out, _COPY_CHUNK)  # offsets are relative to the data: unchanged
            return True
    _link_or_copy(source, target)
    return False


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
    with written_whole(target) as tmp:
        renamed = False
        for path in sorted(hf_dir.iterdir()):
            if path.suffix == ".safetensors":
                renamed |= rename_tensors(path, tmp / path.name, HEAD_NAMES)
            elif path.name.endswith(".safetensors.index.json"):
                index = json.loads(path.read_text())
                index["weight_map"] = {HEAD_NAMES.get(k, k): v for k, v in index["weight_map"].items()}
                (tmp / path.name).write_text(json.dumps(index, indent=2) + "\n")
            elif path.is_file() and path.name != "config.json":
                shutil.copyfile(path, tmp / path.name)
        if not renamed:
            raise ConfigError(f"--checkpoint_path: {hf_dir} holds no head weight (score.weight)")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        serving = serving_info(run, hf_dir, config["num_labels"])
        (tmp / SERVING_FILE).write_text(json.dumps(serving, indent=2, ensure_ascii=False) + "\n")
    return target

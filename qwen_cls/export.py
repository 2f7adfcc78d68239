"""``qwen-cls export``: rebuild a checkpoint's ``hf_model/`` from its sharded DeepSpeed state, or write a
copy of ``hf_model/`` in another dtype (a checkpoint whose state was not kept: ``keep_state_last_n``); with
``--format vllm`` the folder vLLM serves (:mod:`qwen_cls.serving`).

For a checkpoint saved or copied without ``hf_model/``. DeepSpeed's ``zero_to_fp32`` reads the fp32 master
weights from the shards lazily (the optimizer files are memory-mapped and their Adam moments dropped), so
the host holds about one copy of the weights, in the dtype written, rather than the states of every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedConfig

from qwen_cls.config import LoraSettings, RunConfig
from qwen_cls.console import say
from qwen_cls.data import load_processor
from qwen_cls.errors import ConfigError
from qwen_cls.families import is_classifier
from qwen_cls.loading import DTYPES, training_dtype
from qwen_cls.losses import head_for
from qwen_cls.modeling import QwenVLForImageClassification, classifier_config
from qwen_cls.run_dir import HF_DIR, INFO_FILE, STATE_DIR, check_new_folder, read_info, written_whole
from qwen_cls.serving import SERVING_FILE, export_vllm
from qwen_cls.strategy import zero_weights


def export(
    checkpoint_path: str,
    output: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    format: Literal["hf", "vllm"] = "hf",
) -> Path:
    """``hf_model/`` rebuilt from a checkpoint's shards, or a copy of it in another dtype, or (``format="vllm"``)
    the folder vLLM serves (``qwen-cls export``; the parameters: :func:`qwen_cls.commands.export`)."""
    checkpoint = Path(checkpoint_path)
    if format == "vllm":
        if dtype != "auto":
            raise ConfigError(
                "--dtype: the vLLM export keeps hf_model/'s dtype (vLLM's --dtype casts when it loads)"
            )
        if not (checkpoint / HF_DIR).is_dir() and (checkpoint / STATE_DIR / "latest").is_file():
            say(f"{checkpoint} has DeepSpeed shards only: rebuilding its {HF_DIR}/ first")
            export(checkpoint_path)
        target = export_vllm(checkpoint, output)
        say(
            f"wrote {target}: vllm serve {target} --runner pooling (prompts and columns in {target}/{SERVING_FILE})"
        )
        return target
    info_file = checkpoint / INFO_FILE
    shards = (checkpoint / STATE_DIR / "latest").is_file()
    if not (shards or (checkpoint / HF_DIR).is_dir()) or not info_file.is_file():
        raise ConfigError(
            f"--checkpoint_path: {checkpoint} is not a checkpoint folder with {INFO_FILE} and DeepSpeed shards "
            f"in {STATE_DIR}/ or an {HF_DIR}/"
        )
    info = read_info(checkpoint)
    if dtype == "auto":
        dtype = training_dtype(info.precision or "32")
    target = Path(output) if output else checkpoint / HF_DIR
    check_new_folder(target)
    run = RunConfig.from_mapping(info.config, str(info_file))
    lora = run.model.get("lora") and LoraSettings(**run.model["lora"]).enabled
    if shards and lora and not (checkpoint / HF_DIR).is_dir():
        raise ConfigError(
            f"--checkpoint_path: {checkpoint} is a LoRA checkpoint whose hf_model/ (the merged model) is missing; "
            f"its {STATE_DIR}/ holds only what trained (adapters and head), not the model"
        )
    with written_whole(target) as tmp:
        if shards and not lora:
            count = _from_shards(checkpoint, run, DTYPES[dtype], tmp)
        else:  # no shards (a state not kept, one device's Lightning state) or LoRA: hf_model/ holds the model
            model = QwenVLForImageClassification.from_pretrained(checkpoint / HF_DIR, dtype=DTYPES[dtype])
            count = sum(p.numel() for p in model.parameters())
            model.save_pretrained(tmp)
            AutoProcessor.from_pretrained(checkpoint / HF_DIR).save_pretrained(tmp)
    say(f"wrote {target} ({dtype}, {count:,} parameters)")
    return target


def _from_shards(checkpoint: Path, run: RunConfig, dtype: torch.dtype, out: Path) -> int:
    """The classifier (config of the base model in the run's config) with the shards' weights, and the base
    model's processor, written to ``out``; returns the parameter count."""
    base = run.model["pretrained_name"]
    config = _config(base, int(run.model["num_labels"]), head_for(run.loss.type), run.loss.scale)
    weights = zero_weights(checkpoint)
    state = {name: tensor.contiguous().to(dtype) for name, tensor in weights.items()}
    with torch.device("meta"):  # only the structure: save_pretrained writes the weights given
        model = QwenVLForImageClassification(config).to(dtype)  # config.json records the dtype
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ConfigError(
            f"--checkpoint_path: {checkpoint} lacks {len(missing)} weights of the classifier, e.g. {missing[:3]}"
        )
    model.save_pretrained(out, state_dict=state)
    load_processor(base, run.data.get("min_pixels"), run.data.get("max_pixels")).save_pretrained(out)
    return sum(t.numel() for t in state.values())


def _config(base: str, num_labels: int, head: str, scale: float) -> PreTrainedConfig:
    if not (Path(base) / "config.json").is_file():
        raise ConfigError(f"model.pretrained_name: {base} (from the checkpoint's config) has no config.json")
    config = AutoConfig.from_pretrained(base)
    if is_classifier(config.model_type):
        return config
    return classifier_config(config, num_labels, head, scale)

"""LoRA on the classifier through peft: which projections get adapters, the merged weights ``hf_model/`` holds,
and ``adapter/`` in peft's own format.

The base weights are frozen; the adapters and the head (and ``modules_to_save``) train. Checkpoints keep the
promised layout: ``hf_model/`` holds the merged weights (W + alpha/r * B A, computed in fp32 one matrix at a
time) under the plain model's names, so ``from_pretrained`` alone loads it and every tool works unchanged.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from qwen_cls.config import LoraSettings
from qwen_cls.errors import ConfigError
from qwen_cls.families import DEFAULT_FAMILY, FAMILIES, Family, family_of

HEAD = "score"
ADAPTER_DIR = "adapter"


def target_modules(settings: LoraSettings, family: Family = FAMILIES[DEFAULT_FAMILY]) -> str | list[str]:
    """peft's ``target_modules``: the user's suffixes, or a pattern over the family's language-model projections
    (and its vision tower's with ``vision``); a pattern, because the vision MLP may have the same names."""
    if settings.target_modules:
        return list(settings.target_modules)

    def alternatives(names: tuple[str, ...]) -> str:
        return "|".join(name.replace(".", r"\.") for name in names)

    parts = [rf"model\.language_model\.layers\.\d+\.({alternatives(family.lm_projections)})"]
    if settings.vision:
        parts.append(rf"model\.visual\.blocks\.\d+\.({alternatives(family.vision_projections)})")
    return rf"^({'|'.join(parts)})$"


def apply_lora(net: torch.nn.Module, settings: LoraSettings, seed: int = 0, partitioned: bool = False):
    """Adapters injected into ``net`` in place; returns peft's ``PeftModel`` around it (for ``adapter/``).

    The head (and ``modules_to_save``) train in place rather than as peft's wrapped copies: no second head
    in memory, and no deep copy of a ZeRO-3 partition. The adapters start from a seeded A (peft's
    kaiming-uniform) and B = 0, written through the gathered parameters under ZeRO-3: built inside
    DeepSpeed's ``zero.Init``, peft's own initialisation would only touch empty placeholders."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(settings, family_of(net.config.model_type)),
    )
    try:
        peft_model = get_peft_model(net, config)
    except ValueError as e:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"model.lora.target_modules: {settings.target_modules} ({e}); the model's linear layers are named "
            f"{', '.join(names)}"
        ) from None
    for name in full_modules(net, settings):
        net.get_submodule(name).requires_grad_(True)
    config.modules_to_save = full_modules(net, settings)  # adapter/: peft loads their weights onto the base
    _init_adapters(net, seed, partitioned)
    return peft_model


def full_modules(net: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """The modules trained in full: the head, and each ``modules_to_save`` entry (a name or a name's suffix)."""
    found = [HEAD]
    names = [n for n, _ in net.named_modules()]
    for wanted in settings.modules_to_save:
        matches = [n for n in names if n == wanted or n.endswith(f".{wanted}")]
        if not matches:
            raise ConfigError(f"model.lora.modules_to_save: {wanted!r} is no module of the model")
        found += [m for m in matches if m not in found]
    return found


def _init_adapters(net: torch.nn.Module, seed: int, partitioned: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, module in adapted(net):
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if partitioned:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([a, b], modifier_rank=0)
        with gathered if partitioned else contextlib.nullcontext(), torch.no_grad():
            shape = getattr(a, "ds_shape", a.shape)
            bound = 1 / math.sqrt(shape[1])  # kaiming_uniform(a=sqrt(5)), as peft and nn.Linear draw
            a.copy_((torch.rand(shape, generator=generator) * 2 - 1) * bound)
            b.zero_()


def adapted(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules carrying LoRA adapters."""
    return [(n, m) for n, m in net.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def scaling(settings: LoraSettings) -> float:
    return settings.alpha / settings.r


def is_lora_param(name: str) -> bool:
    """Whether a parameter (or state-dict entry) is one of peft's adapters (``lora_A``/``lora_B``)."""
    return ".lora_" in name


def merged_items(state: Mapping[str, torch.Tensor], scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain classifier's weights from a LoRA model's state dict: each adapted weight as W + scale * B A
    (in fp32, back to W's dtype), adapters dropped. One merged matrix at a time: a 72B model's save never holds
    two copies."""
    for name, value in state.items():
        if is_lora_param(name):
            continue
        if ".base_layer." in name:
            prefix, param = name.split(".base_layer.")
            a, b = state.get(f"{prefix}.lora_A.default.weight"), state.get(f"{prefix}.lora_B.default.weight")
            if param == "weight" and a is not None:
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            yield f"{prefix}.{param}", value
        else:
            yield name, value


def adapter_items(state: Mapping[str, torch.Tensor], full: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """What ``adapter/`` holds, under the names peft's ``get_peft_model_state_dict`` gives (and
    ``PeftModel.from_pretrained`` loads): the adapters, and the modules ``full`` trained in full; taken from
    the model's state dict (a ZeRO-3 one gathered)."""
    for name, value in state.items():
        adapter = re.fullmatch(r"(.*\.lora_[AB])\.default\.(weight|bias)", name)
        if adapter:
            yield f"base_model.model.{adapter[1]}.{adapter[2]}", value
        elif any(name.startswith(f"{module}.") for module in full):
            yield f"base_model.model.{name}", value


def write_adapter(path: Path, config, weights: Mapping[str, torch.Tensor]) -> None:
    """peft's files: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "adapter_model.safetensors"))

"""DeepSpeed from the YAML, the same on a GPU cluster and on a CPU test machine.

``trainer.strategy: deepspeed_stage_2`` / ``deepspeed_stage_3`` (and ``_offload``), or a ``deepspeed:``
section (a DeepSpeed JSON file or the same settings as a mapping). The micro-batch and gradient accumulation come from
``data.batch_size`` and ``trainer.accumulate_grad_batches``, never asked for twice. On CUDA the strategy is
Lightning's ``DeepSpeedStrategy`` unchanged; without CUDA it is :class:`CPUDeepSpeedStrategy`, which exists
so the multi-GPU code paths (ZeRO-2/3 sharding, gathering, resume) run in tests on CPU processes over gloo.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry

from qwen_cls.errors import CheckpointError, ConfigError
from qwen_cls.run_dir import STATE_DIR
from qwen_cls.saving import host_copy

# Keys of a DeepSpeed config that qwen-cls fills in from its own settings; "auto" is accepted for each.
FILLED_IN = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "train_batch_size": "data.batch_size x trainer.accumulate_grad_batches x processes",
    "gradient_clipping": "training.max_grad_norm",
}
# The optimizer and schedule are qwen-cls's (AdamW + warm-up cosine from training.*), under every strategy.
REFUSED = {"optimizer": "training.lr and training.weight_decay", "scheduler": "training.warmup_steps"}


def uses_deepspeed(strategy: Any, section: Any) -> bool:
    return section is not None or (isinstance(strategy, str) and strategy.startswith("deepspeed"))


def deepspeed_kwargs(
    strategy: Any, section: str | Mapping | None, batch_size: int, accumulate: int, max_grad_norm: float
) -> dict[str, Any] | None:
    """``DeepSpeedStrategy`` init arguments for a config, or None when the run does not use DeepSpeed.

    A pure function of the config: ``strategy`` is ``trainer.strategy``, ``section`` the ``deepspeed:``
    section (a JSON path or a mapping)."""
    if not uses_deepspeed(strategy, section):
        return None
    if section is None:
        if strategy not in StrategyRegistry:
            known = sorted(n for n in StrategyRegistry if n.startswith("deepspeed"))
            raise ConfigError(f"trainer.strategy: unknown {strategy!r}; choose one of {', '.join(known)}")
        return {**StrategyRegistry[strategy]["init_params"], "logging_batch_size_per_gpu": batch_size}
    if strategy not in (None, "auto", "deepspeed"):
        raise ConfigError(
            f"trainer.strategy: {strategy!r} and a deepspeed: section both configure the strategy; keep the "
            "section (with trainer.strategy: deepspeed or unset) or the strategy name"
        )
    config = _load_section(section)
    ours = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulate,
        "gradient_clipping": max_grad_norm,
    }
    for key, source in FILLED_IN.items():
        value = config.pop(key, "auto")
        if value != "auto" and key in ours and value != ours[key]:
            raise ConfigError(
                f"deepspeed.{key}: {value}, but {source} is {ours[key]}; set it once, in {source} (or 'auto' here)"
            )
        if value != "auto" and key not in ours:
            raise ConfigError(f"deepspeed.{key}: remove it (or write 'auto'); it is {source}")
    for key, source in REFUSED.items():
        if key in config:
            raise ConfigError(f"deepspeed.{key}: remove it; qwen-cls builds the {key} from {source}")
    for key in ("bf16", "fp16"):  # from trainer.precision
        if isinstance(config.get(key), Mapping) and config[key].get("enabled") == "auto":
            config.pop(key)
    config["train_micro_batch_size_per_gpu"] = batch_size
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW from configure_optimizers
    return {"config": config}


def _load_section(section: str | Mapping) -> dict[str, Any]:
    if isinstance(section, Mapping):
        return copy.deepcopy(dict(section))
    path = Path(section)
    if not path.is_file():
        raise ConfigError(
            f"deepspeed: {path} not found (a DeepSpeed JSON config, or the settings as a mapping)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object")
    return config


def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def build_strategy(kwargs: dict[str, Any], cuda: bool) -> DeepSpeedStrategy:
    """Lightning's strategy (with one fix) on CUDA, the CPU subclass otherwise."""
    strategy = (QwenDeepSpeedStrategy if cuda else CPUDeepSpeedStrategy)(**kwargs)
    if not cuda and offloads_optimizer(strategy.config):
        # DeepSpeed insists on its own CPU Adam (a C++ op compiled on first use) with a client optimizer
        # and offload; on CPU the offload is a no-op and torch's AdamW does the same work
        strategy.config.setdefault("zero_force_ds_cpu_optimizer", False)
    return strategy


class QwenDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with gradient accumulation scaled once. Lightning divides each
    micro-batch's loss by ``accumulate_grad_batches``, and DeepSpeed's ``engine.backward`` divides it again
    by ``gradient_accumulation_steps`` (measured: with 2 micro-batches the gradient was half of one
    process's over the same 8 images, and so was its norm); DeepSpeed's division is turned off."""

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)


class CPUDeepSpeedStrategy(QwenDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on CPU processes (gloo), for testing; never used on a GPU machine.

    DeepSpeed itself runs on CPU (it picks its CPU accelerator when there is no CUDA); Lightning's strategy
    refuses a CPU in four places, each passed here: the CUDA-only check in ``setup_environment``; device
    indices, which must be ``0..n-1`` (CPU devices have none, so they get ``cpu:<local_rank>``), and which
    DeepSpeed also receives as ``device_rank``; and the root device entered as a context while the model is
    built, which transformers' ``from_pretrained`` would read as a device map (plain ``cpu`` is entered).
    DeepSpeed's shared-memory collective op, compiled the first time a CPU process group starts (~2 min of
    C++), is skipped: gloo does the same work.
    """

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._parallel_devices = (
            None if devices is None else [torch.device("cpu", i) for i in range(len(devices))]
        )

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def _init_deepspeed_distributed(self) -> None:
        # the module itself: the name deepspeed.comm.torch is the torch package deepspeed.comm imports
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        super()._init_deepspeed_distributed()

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None):
        if self.zero_stage_3:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("cpu"), self.precision_plugin.tensor_init_context():
            yield


def zero_stage_3(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def make_adamw(groups: list[dict], lr: float, strategy: Any) -> torch.optim.Optimizer:
    """torch's AdamW; DeepSpeed's CPU Adam (vectorised C++, compiled once) where ZeRO offloads the optimizer
    to the host of a GPU machine, since torch's AdamW on the host is several times slower there."""
    if (
        isinstance(strategy, DeepSpeedStrategy)
        and strategy.root_device.type == "cuda"
        and offloads_optimizer(strategy.config)
    ):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr)


def gathered_state_dict(
    module: torch.nn.Module, keep: bool, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The module's full weights in host memory (floating point ones in ``dtype`` when given) where ``keep``
    (one rank); every rank must call this.

    ZeRO-3 partitions are gathered one parameter at a time, so beyond its own partition no rank ever holds
    more than one whole parameter on its device; the keeping rank's host holds one copy of the weights."""
    import deepspeed

    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        with deepspeed.zero.GatheredParameters(
            [tensor] if hasattr(tensor, "ds_id") else [], modifier_rank=None
        ):
            if keep:
                state[name] = host_copy(tensor, dtype)
    return state


def load_into_partitions(module: torch.nn.Module, state: Mapping[str, Any] | None) -> None:
    """Copy ``state`` (held by global rank 0 alone; None elsewhere) into ZeRO-3 partitioned parameters; every
    rank calls. Values may be DeepSpeed's lazy ``zero_to_fp32`` tensors: each is read when it is copied."""
    import deepspeed

    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if state is not None:
                param.data.copy_(state[name].contiguous())


def zero_weights(checkpoint: str | Path) -> dict[str, Any]:
    """The fp32 weights in a checkpoint's sharded DeepSpeed state, keyed like the classifier's parameters;
    lazy: DeepSpeed's ``zero_to_fp32`` reads each tensor from the shards (memory-mapped) when it is used."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dir = Path(checkpoint) / STATE_DIR
    if not (state_dir / "latest").is_file():
        raise CheckpointError(f"{checkpoint}: no DeepSpeed state in {STATE_DIR}/ (it holds no 'latest' file)")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), lazy_mode=True)
    names = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return {k.removeprefix("net."): v for k, v in names.items() if k.startswith("net.")}


def load_zero3_weights(trainer: L.Trainer, checkpoint: str | Path) -> None:
    """A checkpoint's weights into the ZeRO-3 partitioned module, every rank taking part. DeepSpeed's own
    loader fails for a module set up for evaluation (``'DeepSpeedZeRoOffload' object has no attribute
    '_restore_from_bit16_weights'``, deepspeedai/DeepSpeed#7272); global rank 0 reads the consolidated
    weights from the shards instead, one tensor at a time."""
    weights = zero_weights(checkpoint) if trainer.is_global_zero else None
    load_into_partitions(trainer.lightning_module.net, weights)


class LoadZero3Weights(Callback):
    """``qwen-cls validate --ckpt_path`` on a ZeRO-3 run: the checkpoint's weights, loaded as the strategy
    cannot (see :func:`load_zero3_weights`), once the module is partitioned and before validating."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = checkpoint

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        load_zero3_weights(trainer, self.checkpoint)

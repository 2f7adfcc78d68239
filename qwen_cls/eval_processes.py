"""Where ``evaluate`` and ``evaluate-all`` run: one process, or data-parallel over devices and nodes, or with the
weights partitioned by DeepSpeed ZeRO-3 for a model larger than one device.

The processes are started once, before the first checkpoint (by Lightning's launcher, or already by torchrun or
srun), so that rank 0 can tell every rank which checkpoints to evaluate; each checkpoint then gets a Trainer of
its own (a DeepSpeed engine belongs to one module), in the same process group.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from qwen_cls.errors import ConfigError
from qwen_cls.strategy import build_strategy, deepspeed_kwargs

# What evaluation can run under: a copy of the model per process (auto: one device, else DDP), or ZeRO-3's
# partitions. ZeRO-1/2 partition the optimizer state and gradients only, which evaluation has none of.
STRATEGIES = ("auto", "ddp", "deepspeed_stage_3", "deepspeed_stage_3_offload")


@dataclass
class EvalDevices:
    """``--devices``, ``--num_nodes``, ``--accelerator``, ``--strategy``, ``--precision`` of the evaluation commands,
    as ``fit``'s trainer keys mean them. ``precision`` None: the run's ``trainer.precision``."""

    devices: int | str = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str | None = None

    def __post_init__(self) -> None:
        if not (self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1)):
            raise ConfigError(f"--devices: a number >= 1 or auto, got {self.devices!r}")
        if self.num_nodes < 1:
            raise ConfigError(f"--num_nodes: must be >= 1, got {self.num_nodes}")
        if self.strategy.startswith("deepspeed") and self.strategy not in STRATEGIES:
            raise ConfigError(
                f"--strategy: {self.strategy} does not partition the weights (ZeRO-1/2 partition the optimizer "
                "state and gradients, which evaluation has none of); use ddp, or deepspeed_stage_3 for a model "
                "larger than one device"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"--strategy: {self.strategy!r} cannot evaluate here; choose one of {', '.join(STRATEGIES)} "
                "(deepspeed_stage_3 partitions a model larger than one device)"
            )


class EvalProcesses:
    """The evaluation's processes: started by :meth:`start`, then one fresh Trainer per checkpoint."""

    def __init__(self, where: EvalDevices, batch_size: int, run_precision: str | None):
        self.where = where
        self.batch_size = batch_size
        self.precision = where.precision or run_precision or "32-true"
        self.trainer = self._new_trainer()

    def _new_trainer(self) -> L.Trainer:
        where = self.where
        strategy: Any = where.strategy
        kwargs = deepspeed_kwargs(strategy, None, self.batch_size, 1, 0.0)
        if kwargs is not None:
            strategy = build_strategy(kwargs, where.accelerator != "cpu" and torch.cuda.is_available())
        return L.Trainer(
            accelerator=where.accelerator,
            devices=where.devices,
            num_nodes=where.num_nodes,
            strategy=strategy,
            precision=self.precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )

    def start(self) -> EvalProcesses:
        """Every rank's process exists and the process group is up (Lightning's launcher starts the other
        local processes here, each running the same command; under torchrun or srun they exist already)."""
        strategy = self.trainer.strategy
        if strategy.launcher is not None:
            strategy.launcher.launch(strategy.setup_environment)
        return self

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (what to evaluate next: the ranks must agree)."""
        return self.trainer.strategy.broadcast(value) if self.world_size > 1 else value

    def validate(self, module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """``Trainer.validate`` of ``module`` on every rank; the metrics are reduced over all of them."""
        self.trainer.validate(module, datamodule=datamodule, verbose=False)
        gc.collect()  # the previous checkpoint's engine and partitions, before the next one is loaded

"""Where ``evaluate`` and ``evaluate-all`` run: one process, or data-parallel over devices and nodes, or with the
weights partitioned by DeepSpeed ZeRO-3 for a model larger than one device.

The processes are started once, before the first checkpoint (by Lightning's launcher, or already by torchrun or
srun), so that rank 0 can tell every rank which checkpoints to evaluate; one Trainer then validates each checkpoint's
module in turn (under ZeRO-3 each gets an engine of its own).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qwen_cls.console import say
from qwen_cls.errors import ConfigError
from qwen_cls.strategy import LoadZero3Weights, build_strategy, deepspeed_kwargs

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

    @property
    def partitions(self) -> bool:
        """Whether the weights are partitioned over the processes (ZeRO-3)."""
        return self.strategy.startswith("deepspeed_stage_3")

    def check_rows(self, eval_data: str | os.PathLike | list[str]) -> None:
        """More processes than rows is refused before any process starts (the data module checks again where a
        launcher, torchrun or srun, chose the world size)."""
        processes = self.devices * self.num_nodes if isinstance(self.devices, int) else 1
        files = [eval_data] if isinstance(eval_data, str | os.PathLike) else list(eval_data)
        if processes == 1 or not all(
            os.path.isfile(name) for name in files
        ):  # the data module names a missing file
            return
        rows = 0
        for name in files:
            with open(name, "rb") as fh:
                rows += sum(1 for line in fh if line.strip())
            if rows >= processes:
                return
        raise ConfigError(
            f"--devices: {processes} processes for the {rows} rows of {', '.join(map(str, files))}; each process "
            "needs a row at least: use fewer devices (or nodes)"
        )


class EvalProcesses:
    """The evaluation's processes: started by :meth:`start`, then one fresh Trainer per checkpoint."""

    def __init__(self, where: EvalDevices, batch_size: int, run_precision: str | None):
        self.where = where
        self.batch_size = batch_size
        self.precision = where.precision or run_precision or "32-true"
        self.said_partitions = False
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

    def validate(
        self, module: L.LightningModule, datamodule: L.LightningDataModule, shards: Path | None = None
    ) -> None:
        """``Trainer.validate`` of ``module`` on every rank; the metrics are reduced over all of them. ``shards``:
        a checkpoint whose DeepSpeed shards are read into the partitioned module first."""
        loader = [LoadZero3Weights(shards)] if shards is not None else []
        self.trainer.callbacks.extend(loader)
        try:
            self.trainer.validate(module, datamodule=datamodule, verbose=False)
        finally:
            for callback in loader:
                self.trainer.callbacks.remove(callback)
        if not self.said_partitions:
            self.said_partitions = True
            say_partitions(module, self.world_size)
        gc.collect()  # the previous checkpoint's engine and partitions, before the next one is loaded


def say_partitions(module: torch.nn.Module, world_size: int) -> None:
    """Under ZeRO-3, how much of the model rank 0 holds (each rank as much): the proof that no rank held it whole."""
    params = list(module.parameters())
    if not params or not all(hasattr(p, "ds_tensor") for p in params):
        return
    total, local = sum(p.ds_numel for p in params), sum(p.ds_tensor.numel() for p in params)
    say(
        f"ZeRO-3: the {total:,} weights partitioned over {world_size} processes; rank 0 holds {local:,} "
        f"({100 * local / total:.1f}%) between forward passes"
    )

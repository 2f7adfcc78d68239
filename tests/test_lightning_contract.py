"""Every private Lightning and DeepSpeed member qwen-cls overrides, calls or reads still exists, with the
parameters our overrides take: pyproject bounds both to the minor version tested, and this test names the member
that moved when a bound is raised (a renamed private hook would otherwise be skipped silently: checkpoints not
written, or written under Lightning's own rules)."""

from __future__ import annotations

import inspect
from importlib import import_module

import lightning
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy

from qwen_cls.checkpoint import QwenCheckpoint
from qwen_cls.strategy import CPUDeepSpeedStrategy

# (class, private member): the ones QwenCheckpoint overrides, and those it calls or sets
OVERRIDDEN = [
    (ModelCheckpoint, "_ModelCheckpoint__warn_if_dir_not_empty", QwenCheckpoint),
    (ModelCheckpoint, "_monitor_candidates", QwenCheckpoint),
    (ModelCheckpoint, "_save_checkpoint", QwenCheckpoint),
    (ModelCheckpoint, "_remove_checkpoint", QwenCheckpoint),
    (DeepSpeedStrategy, "_init_deepspeed_distributed", CPUDeepSpeedStrategy),
]
CALLED = [
    (ModelCheckpoint, "_should_skip_saving_checkpoint"),
    (LightningCLI, "_get"),  # train.QwenCLI.instantiate_trainer builds the trainer as LightningCLI does
    (LightningCLI, "_parser"),
    (LightningCLI, "_instantiate_trainer"),
]
INSTANCE = [
    "_defer_save_until_validation",
    "_last_global_step_saved",
    "_last_checkpoint_saved",
]


def test_private_lightning_members_we_rely_on_still_exist():
    missing = [f"{cls.__name__}.{name}" for cls, name, _ in OVERRIDDEN if not hasattr(cls, name)]
    missing += [f"{cls.__name__}.{name}" for cls, name in CALLED if not hasattr(cls, name)]
    callback = ModelCheckpoint(every_n_train_steps=1)
    missing += [f"ModelCheckpoint().{name}" for name in INSTANCE if not hasattr(callback, name)]
    loop = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False).fit_loop.epoch_loop
    for path in ("batch_progress.current.processed", "batch_progress.current.ready", "batch_idx"):
        target = loop  # the data order on resume, the epoch in progress at a save, error messages
        for part in path.split("."):
            target = getattr(target, part, None)
        if target is None:
            missing.append(f"trainer.fit_loop.epoch_loop.{path}")
    progress = Trainer(accelerator="cpu", logger=False).fit_loop.state_dict().get("epoch_progress", {})
    if set(progress.get("current", {})) != {
        "ready",
        "started",
        "processed",
        "completed",
    }:  # set by QwenCheckpoint
        missing.append(
            "fit_loop.state_dict()['epoch_progress']['current'][ready|started|processed|completed]"
        )
    assert not missing, (
        f"Lightning {lightning.__version__} lacks {', '.join(missing)}: update qwen_cls/checkpoint.py, strategy.py, "
        "data.py or model.py before raising the lightning bound in pyproject.toml"
    )


def test_private_members_set_or_read_on_other_objects_still_exist():
    """Set or read rather than defined: they do not fail loudly when they move."""
    missing = []
    # model.QwenClassifier reads its trainer before Lightning's `trainer` property would raise (no trainer yet)
    if "_trainer" not in inspect.getsource(LightningModule.__init__):
        missing.append("LightningModule._trainer")
    # stop_signal.StopOnSignal sets Lightning's SIGTERM flag on every rank at once
    trainer = Trainer(accelerator="cpu", logger=False)
    if not hasattr(getattr(trainer, "_signal_connector", None), "received_sigterm"):
        missing.append("Trainer._signal_connector.received_sigterm")
    # strategy.CPUDeepSpeedStrategy keeps CPU devices in the attribute behind Lightning's parallel_devices property
    if "self._parallel_devices" not in inspect.getsource(ParallelStrategy):
        missing.append("ParallelStrategy._parallel_devices")
    from deepspeed.runtime.engine import DeepSpeedEngine

    # saving.use_host_checkpoint_engine builds its checkpoint engine from the engine's config
    if "self._config" not in inspect.getsource(DeepSpeedEngine.__init__):
        missing.append("DeepSpeedEngine._config")
    # strategy.CPUDeepSpeedStrategy skips the shared-memory op's build on CPU
    if not hasattr(import_module("deepspeed.comm.torch"), "build_shm_op"):
        missing.append("deepspeed.comm.torch.build_shm_op")
    assert not missing, (
        f"{', '.join(missing)} moved: update qwen_cls before raising the bound in pyproject.toml"
    )


def test_our_overrides_take_lightnings_parameters():
    for cls, name, ours in OVERRIDDEN:
        theirs = list(inspect.signature(getattr(cls, name)).parameters)
        mine = list(inspect.signature(getattr(ours, name)).parameters)
        assert mine == theirs, f"{ours.__name__}.{name}{mine} no longer matches Lightning's {theirs}"

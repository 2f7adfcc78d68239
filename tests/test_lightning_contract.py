"""The private Lightning members qwen-cls overrides or reads still exist, with the parameters our overrides
take: pyproject bounds Lightning to the minor version tested, and this test names the member that moved when
that bound is raised (a renamed private hook would otherwise be skipped silently: checkpoints not written, or
written under Lightning's own rules)."""

from __future__ import annotations

import inspect

import lightning
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

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
CALLED = [(ModelCheckpoint, "_should_skip_saving_checkpoint")]
INSTANCE = [
    "_every_n_train_steps",
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


def test_our_overrides_take_lightnings_parameters():
    for cls, name, ours in OVERRIDDEN:
        theirs = list(inspect.signature(getattr(cls, name)).parameters)
        mine = list(inspect.signature(getattr(ours, name)).parameters)
        assert mine == theirs, f"{ours.__name__}.{name}{mine} no longer matches Lightning's {theirs}"

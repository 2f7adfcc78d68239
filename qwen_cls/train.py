"""``qwen-cls fit`` and ``validate``: LightningCLI over the LightningModule and the DataModule.

The YAML has the sections (``model``, ``loss``, ``datasets``, ``data``, ``training``,
``evaluation``, ``best_model_tracking``, ``wandb``) next to Lightning's ``trainer``. ``model:`` and
``data:`` are the init arguments of the LightningModule and DataModule; the other sections are typed
dataclasses linked into them, so each key is set in one place and every key can be overridden on the
command line (``--training.lr 1e-4``). Before anything is built, :func:`qwen_cls.policy.resolve`
decides what the run really does, and the keys it overrode are printed. :mod:`qwen_cls.cli` dispatches here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qwen_cls.api import FitResult
from qwen_cls.checkpoint import QwenCheckpoint
from qwen_cls.cli import config_error_within, parse_error
from qwen_cls.config import SECTIONS, RunConfig, without_former_copies
from qwen_cls.console import quiet_library_chatter, say
from qwen_cls.data import QwenDataModule
from qwen_cls.errors import ConfigError
from qwen_cls.loading import refuse_unsafe_checkpoint
from qwen_cls.model import QwenClassifier
from qwen_cls.monitor import LogLineProgress, RunPlots, TrainingMonitor, wandb_mode
from qwen_cls.policy import Resolution, resolve, resume_changes
from qwen_cls.run_dir import (
    HF_DIR,
    INFO_FILE,
    checkpoint_step,
    drop_overwritten,
    has_state,
    list_checkpoints,
    marked_running,
    read_info,
    refuse_if_running,
    remove_previous_run,
    restore_set_aside,
    resume_state_path,
    scan_checkpoints,
)
from qwen_cls.stop_signal import StopOnSignal
from qwen_cls.strategy import (
    LoadZero3Weights,
    build_strategy,
    deepspeed_kwargs,
    load_zero3_weights,
    zero_stage_3,
)

# How each section reaches what reads it. The module and the data module are handed whole sections, as the
# objects their classes built (checked in __post_init__, after the resolver wrote its overrides); Lightning's
# own Trainer and the processor path take single values. (source, target, function of the source value)
SECTION_LINKS = [
    ("loss", "model.loss", None),
    ("datasets", "model.datasets", None),
    ("datasets", "data.datasets", None),
    ("training", "model.training", None),
    ("wandb", "model.log_dataset_metrics", lambda wandb: wandb.log_dataset_metrics),
]
VALUE_LINKS = [
    ("model.pretrained_name", "data.processor_path", None),
    ("seed_everything", "data.seed", lambda s: s if isinstance(s, int) and not isinstance(s, bool) else 0),
    ("training.epochs", "trainer.max_epochs", None),
    ("training.max_steps", "trainer.max_steps", None),
    ("training.logging_steps", "trainer.log_every_n_steps", None),
    ("training.max_grad_norm", "trainer.gradient_clip_val", lambda v: v or None),
    ("training.output_dir", "trainer.default_root_dir", None),
]


class StepCSVLogger(CSVLogger):
    """CSVLogger writing the optimizer step as an integer (the module logs it as a float metric)."""

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, None if step is None else int(step))


def refuse_secrets(cfg, prefix: str = "") -> None:
    """A config value holding this environment's W&B API key is refused, never rewritten: configs are saved
    beside every checkpoint and in the logs, and W&B reads its key from ``WANDB_API_KEY`` or ``wandb login``.
    Nothing else is touched: a hub-cache path or a run name with 40 hex characters is just that."""
    key = os.environ.get("WANDB_API_KEY", "")
    if len(key) < 16:
        return
    for name, value in cfg.items():
        dotted = f"{prefix}{name}"
        if hasattr(value, "items"):
            refuse_secrets(value, f"{dotted}.")
        elif any(isinstance(v, str) and key in v for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(
                f"{dotted}: holds the W&B API key of WANDB_API_KEY; remove it (configs are saved with every "
                "checkpoint; W&B reads the key from the environment or `wandb login`)"
            )


def check_config_files(args: list[str]) -> None:
    """Each ``--config`` file parses as a YAML mapping (:func:`load_config_file`) and sets no key that a link
    sets; nor does the command line (:func:`refuse_linked_keys`)."""
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            load_config_file(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(args):
            load_config_file(args[i + 1])
    for arg in args:
        flag = arg.split("=", 1)[0].removeprefix("--")
        owner = linked_owner(flag)
        if owner:
            raise ConfigError(f"{flag}: set by {owner}; give --{owner} instead")


def load_config_file(path: str | Path, key: str = "--config") -> dict:
    """A YAML config as a mapping, or one line naming the file (and the line of a syntax error) instead of
    jsonargparse's usage page."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {path} is not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{key}: {where}: YAML syntax error: {problem}") from None
    if data is None:
        raise ConfigError(f"{key}: {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{key}: {path} must hold sections (model:, data:, training:, ...), not a {type(data).__name__}"
        )
    refuse_linked_keys(data, f"{key}: {path}")
    return data


# each key a link sets -> the key that sets it: given directly, jsonargparse would drop it (YAML) or refuse it
# with a type error (command line)
LINKED = {target: source for source, target, _ in SECTION_LINKS + VALUE_LINKS}


def linked_owner(key: str) -> str | None:
    """The key that sets ``key`` (``model.training.lr`` -> ``training.lr``), or None."""
    for target, source in LINKED.items():
        if key == target or key.startswith(f"{target}."):
            return source + key[len(target) :]
    return None


def refuse_linked_keys(config: dict, where: str) -> None:
    """One line for a config that sets a key owned by another (``trainer.max_epochs`` is ``training.epochs``)."""
    for target, source in LINKED.items():
        section, key = target.split(".", 1)
        if isinstance(config.get(section), dict) and key in config[section]:
            raise ConfigError(f"{target}: set by {source}; write {source} in the config instead ({where})")


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ConfigError(f"training.output_dir: {output_dir} is not writable ({e.strerror})") from None


class QwenCLI(LightningCLI):
    resolution: Resolution

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name, section in SECTIONS.items():
            parser.add_class_arguments(section, name, sub_configs=True)
        for source, target, fn in SECTION_LINKS:
            parser.link_arguments(source, target, compute_fn=fn, apply_on="instantiate")
        for source, target, fn in VALUE_LINKS:
            parser.link_arguments(source, target, compute_fn=fn)
        parser.add_argument(
            "--deepspeed",
            type=str | dict | None,
            default=None,
            help="DeepSpeed settings: a DeepSpeed JSON file or the same settings as a mapping (micro-batch, accumulation and "
            "clipping are filled in from data.batch_size, trainer.accumulate_grad_batches, training.max_grad_norm)",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        refuse_secrets(cfg)
        run = RunConfig.from_mapping(
            cfg.as_dict()
        )  # each section checks its values before the resolver reads them
        for name, dataset in run.datasets.dataset_configs.items():  # a class-names file is read once: the run
            cfg.datasets.dataset_configs[name]["class_names"] = dataset.class_names  # stores the list
        self.resolution = resolve(cfg.as_dict())
        for override in self.resolution.overrides:
            say(str(override))
        for section in ("training", "evaluation", "best_model_tracking"):
            for key, value in self.resolution.config[section].items():
                if key not in ("evaluation", "best_model_tracking"):
                    cfg[f"{section}.{key}"] = value
        if self.subcommand != "validate":  # fit, or objects built for training (run=False)
            for key, value in self.resolution.trainer.items():
                cfg[f"trainer.{key}"] = value
        elif not cfg.trainer.limit_val_batches:  # a config saved by a no-evaluation run says 0
            cfg.trainer.limit_val_batches = None

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        output_dir = cfg.training.output_dir
        run_info = {
            "config": self.resolution.config,
            "overrides": [str(o) for o in self.resolution.overrides],
        }
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        strategy = self._deepspeed_strategy(cfg)
        if strategy is not None:
            trainer_config["strategy"] = strategy
        retention = {
            key: cfg.training[key]
            for key in (
                "keep_last_n",
                "keep_state_last_n",
                "save_dtype",
                "background_save",
                "disk_check",
                "save_adapter",
            )
        }
        callbacks = [QwenCheckpoint(output_dir, run_info=run_info, **retention, **self.resolution.checkpoint)]
        if self.subcommand == "fit":
            callbacks.append(StopOnSignal())
            callbacks.append(
                TrainingMonitor(
                    cfg.training.logging_steps,
                    cfg.monitor.system_every_n_steps,
                    cfg.monitor.peak_tflops,
                    recompute=cfg.training.gradient_checkpointing,
                )
            )
            if cfg.monitor.plots is not False:
                callbacks.append(RunPlots(output_dir, cfg.wandb.run_name, cfg.monitor.plots))
        if trainer_config.get("enable_progress_bar") is not False:
            # a live bar in a terminal; in logs (CI, `| tee`) one plain line per logging interval
            tty = sys.stdout.isatty()
            callbacks.append(RichProgressBar() if tty else LogLineProgress(every=cfg.training.logging_steps))
        callbacks += [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if trainer_config.get("logger") is not False:
            trainer_config["logger"] = self._loggers(cfg, output_dir)
        return self._instantiate_trainer(trainer_config, callbacks)

    @staticmethod
    def _deepspeed_strategy(cfg) -> DeepSpeedStrategy | None:
        kwargs = deepspeed_kwargs(
            cfg.trainer.strategy,
            cfg.get("deepspeed"),
            cfg.data.batch_size,
            cfg.trainer.accumulate_grad_batches or 1,
            cfg.training.max_grad_norm,
        )
        if kwargs is None:
            return None
        lora = cfg.model.get("lora")
        # LoRA: DeepSpeed's files hold what trains; the frozen base is loaded from model.pretrained_name again
        kwargs["exclude_frozen_parameters"] = bool(lora and lora.enabled)
        cuda = cfg.trainer.accelerator not in ("cpu",) and torch.cuda.is_available()
        return build_strategy(kwargs, cuda)

    @staticmethod
    def _loggers(cfg, output_dir: str) -> list:
        # each (re)start gets its own logs/version_N/, so resuming never overwrites an earlier metrics.csv
        loggers = [StepCSVLogger(save_dir=output_dir, name="logs")]
        wandb = cfg.wandb
        if wandb.enabled:
            try:
                from wandb import Settings
            except ImportError:
                raise ConfigError(
                    "wandb.enabled: needs the wandb package: pip install 'qwen-cls[wandb]'"
                ) from None

            offline = rank_zero_only.rank == 0 and wandb_mode(wandb.start_timeout) == "offline"
            loggers.append(
                WandbLogger(
                    project=wandb.project,
                    name=wandb.run_name,
                    entity=wandb.entity,
                    tags=wandb.tags,
                    notes=wandb.notes,
                    save_dir=output_dir,
                    offline=offline,
                    settings=Settings(init_timeout=wandb.start_timeout),
                )
            )
        return loggers

    def _state_path(self, ckpt_path: str | None, existing: list[Path], output_dir: Path) -> str | None:
        """``last`` (the newest checkpoint that keeps its state) or a ``checkpoint-<step>`` folder -> what the
        strategy restores from."""
        resumable = [p for p in existing if has_state(p)]
        if ckpt_path == "last":
            if not resumable:
                raise ConfigError(
                    f"ckpt_path: 'last' given, but {output_dir} holds no complete checkpoint with a resumable state"
                )
            ckpt_path = str(resumable[-1])
        folder = Path(ckpt_path) if ckpt_path else None
        if folder is not None and folder.is_dir() and checkpoint_step(folder) is not None:
            if not has_state(folder):
                others = [p for p in scan_checkpoints(folder.parent)[0] if has_state(p)]
                newest = (
                    f"the newest that can be resumed is {others[-1]}" if others else "none in its run can be"
                )
                raise ConfigError(
                    f"ckpt_path: {folder} keeps no resumable state (training.keep_state_last_n dropped it; its "
                    f"{HF_DIR}/ serves evaluate, predict and model.pretrained_name); {newest}"
                )
            ckpt_path = resume_state_path(ckpt_path, isinstance(self.trainer.strategy, DeepSpeedStrategy))
        if ckpt_path and not Path(ckpt_path).exists():
            raise ConfigError(f"ckpt_path: {ckpt_path} does not exist")
        return ckpt_path

    def _existing(self) -> tuple[Path, list[Path]]:
        output_dir = Path(self.config[self.subcommand].training.output_dir)
        if not output_dir.is_dir():
            return output_dir, []
        drop_overwritten(output_dir)
        for path in restore_set_aside(output_dir):
            say(f"restored {path.name}: a kill had caught it set aside while it was being saved again")
        return output_dir, list_checkpoints(output_dir)

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:  # before anything in output_dir is touched (set-aside folders too)
            refuse_if_running(self.config.fit.training.output_dir)
        output_dir, existing = self._existing()
        _check_writable(output_dir)
        ckpt_path = self._state_path(self.config.fit.get("ckpt_path"), existing, output_dir)
        if ckpt_path:
            self._check_resume(ckpt_path)
        overwrite = not ckpt_path and self.config.fit.training.overwrite_output_dir
        if not ckpt_path and existing and not overwrite:
            raise ConfigError(
                f"training.output_dir: {output_dir} already holds checkpoints ({existing[-1].name}); resume with "
                "--ckpt_path last, choose another output_dir, or set training.overwrite_output_dir: true"
            )
        if overwrite and self.trainer.is_global_zero:
            went = remove_previous_run(output_dir)
            if went:
                say(f"overwrite_output_dir: removed the previous run from {output_dir}: {', '.join(went)}")
        self._ckpt_path = ckpt_path

    def _check_resume(self, ckpt_path: str) -> None:
        """The checkpoint's recorded config against this run's: what would change the interrupted epoch's data
        order or the saved shapes is refused in one line; other changes are reported."""
        folder = next(
            (p for p in (Path(ckpt_path), *Path(ckpt_path).parents) if checkpoint_step(p) is not None), None
        )
        if folder is None or not (folder / INFO_FILE).is_file():
            return
        info = read_info(folder)
        now = json.loads(json.dumps(self.resolution.config, default=str))
        saved = without_former_copies(info.config)
        refused, reported = resume_changes(saved, now, info.world_size, self.trainer.world_size)
        if refused:
            head = any(r.startswith(("model.num_labels:", "loss.type:")) for r in refused)
            raise ConfigError(
                f"ckpt_path: resuming {folder.name} with {'; '.join(refused)}; keep the saved value(s), or start a "
                f"new run from its hf_model/ (model.pretrained_name{', model.reinit_head: true' if head else ''})"
            )
        reported = [
            r for r in reported if linked_owner(r.split(":")[0]) is None
        ]  # said as the key that sets it
        if reported:
            say(
                f"resuming {folder.name} with changed settings: {'; '.join(reported)} (the optimizer state and the "
                "learning-rate schedule come from the checkpoint)"
            )

    def fit(self, model, datamodule=None, **kwargs) -> None:
        # weights_only: a checkpoint file never runs code when it is loaded, whatever it contains
        kwargs = {**kwargs, "ckpt_path": self._ckpt_path, "weights_only": True}
        output_dir = self.config.fit.training.output_dir
        with (
            refuse_unsafe_checkpoint(f"ckpt_path: {self._ckpt_path}"),
            marked_running(output_dir, self.trainer.is_global_zero),
        ):
            try:
                self.trainer.fit(model, datamodule=datamodule, **kwargs)
            except SIGTERMException:  # Lightning's is a SystemExit with status 0: a scheduler must see a stop
                raise SystemExit(128 + signal.SIGTERM) from None

    def after_fit(self) -> None:
        cfg = self.config.fit
        if cfg.evaluation.full_eval_at_end and not self.trainer.interrupted:
            final_evaluation(
                self.trainer,
                self.model,
                self.datamodule,
                cfg.evaluation.eval_best_model_only,
                cfg.training.output_dir,
            )
        for logger in self.trainer.loggers:  # the W&B run ends with the training run (also in notebooks)
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                logger.experiment.finish()

    def before_validate(self) -> None:
        self.datamodule.full_eval = True
        output_dir, existing = self._existing()
        self._ckpt_path = self._state_path(self.config.validate.get("ckpt_path"), existing, output_dir)
        if self._ckpt_path and zero_stage_3(self.trainer.strategy):
            self.trainer.callbacks.append(LoadZero3Weights(Path(self._ckpt_path).parent))
            self._ckpt_path = None

    def validate(self, model, datamodule=None, **kwargs) -> None:
        kwargs = {**kwargs, "ckpt_path": self._ckpt_path, "weights_only": True}
        with refuse_unsafe_checkpoint(f"ckpt_path: {self._ckpt_path}"):
            self.trainer.validate(model, datamodule=datamodule, **kwargs)


def final_evaluation(
    trainer: Trainer, model: QwenClassifier, datamodule: QwenDataModule, best_only: bool, output_dir: str
) -> dict:
    """``evaluation.full_eval_at_end``: all validation rows, on the best checkpoint's weights with
    ``eval_best_model_only`` (else the final ones); the result also goes to ``output_dir/eval_final.json``."""
    weights, ckpt_path = "final", None
    best = trainer.checkpoint_callback.best_model_path
    if best_only and best:
        weights = Path(best).name
        if zero_stage_3(trainer.strategy):
            load_zero3_weights(trainer, best)
        else:
            ckpt_path = resume_state_path(best, isinstance(trainer.strategy, DeepSpeedStrategy))
        say(f"full evaluation at end on the best checkpoint's weights: {weights}")
    datamodule.full_eval = True
    trainer.limit_val_batches = 1.0
    trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    record = {"weights": weights, **model.last_eval_metrics}
    if trainer.is_global_zero:
        (Path(output_dir) / "eval_final.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def fit(config: Mapping[str, Any]) -> FitResult:
    """Train as ``qwen-cls fit`` does, from the config's sections as a mapping (``model``, ``data``, ``training``,
    ...), parsed and checked by the same parser, resolver and hooks; errors are raised, never an exit."""
    quiet_library_chatter()
    refuse_linked_keys(dict(config), "config")
    with one_line_config_errors():
        cli = _qwen_cli({"fit": dict(config)}, False, save_config_kwargs={"overwrite": True})
    return FitResult(cli.model, Path(cli.config.fit.training.output_dir))


def run_lightning_cli(args: list[str] | None = None, exit_on_error: bool = True) -> QwenCLI:
    """``exit_on_error=False`` (the Python API): a bad argument raises ``ConfigError`` instead of exiting."""
    quiet_library_chatter()
    given = sys.argv[1:] if args is None else args
    check_config_files(given)
    if any(a.split("=")[0] == "--print_config" for a in given):
        print_config_and_overrides(args, exit_on_error)
    with one_line_config_errors():
        return _qwen_cli(args, exit_on_error, save_config_kwargs={"overwrite": True})


@contextlib.contextmanager
def one_line_config_errors():
    """jsonargparse's errors as one line; a section's own ConfigError also where jsonargparse wrapped it."""
    try:
        yield
    except ArgumentError as e:
        raise parse_error(e) from None
    except ValueError as e:
        within = config_error_within(e)
        if within is None:
            raise
        raise within from None


def _qwen_cli(args: list[str] | None, exit_on_error: bool, **kwargs) -> QwenCLI:
    return QwenCLI(
        QwenClassifier,
        QwenDataModule,
        seed_everything_default=42,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": exit_on_error},
        args=args,
        **kwargs,
    )


def print_config_and_overrides(args: list[str] | None, exit_on_error: bool) -> None:
    """``--print_config``: LightningCLI's YAML of the config as given, then, as YAML comments, what the resolver
    will override when the run starts (the printed values are not all the ones that run)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), one_line_config_errors():
            _qwen_cli(args, exit_on_error)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    text = out.getvalue()
    print(text, end="")
    overrides = resolve(yaml.safe_load(text) or {}).overrides
    print("# when the run starts, the resolver changes " + ("these values:" if overrides else "none of them"))
    for override in overrides:
        print(f"#   {override}")
    sys.exit(0)

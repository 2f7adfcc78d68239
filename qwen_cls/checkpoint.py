"""Checkpoints as folders: ``checkpoint-<step>/{deepspeed/, hf_model/, training_info.json}``.

A ``ModelCheckpoint`` subclass, so Lightning's scheduling (``every_n_train_steps``), top-k retention and
the strategy's own saving (DeepSpeed's sharded engine state, or the Lightning checkpoint on one device)
are reused as they are. A checkpoint is written into a hidden temporary folder and renamed into place
only once its three parts are complete, ``training_info.json`` last: a folder named ``checkpoint-<step>``
is always whole.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qwen_cls.errors import CheckpointError, ConfigError, DiskSpaceError
from qwen_cls.monitor import describe_device, say
from qwen_cls.strategy import gathered_state_dict, load_into_partitions, zero_stage_3

CHECKPOINT_PREFIX = "checkpoint-"
INFO_FILE = "training_info.json"
STATE_DIR = "deepspeed"
STATE_FILE = "state.ckpt"
HF_DIR = "hf_model"
BEST_FILE = "best_checkpoint.json"
RUNNING_FILE = ".qwen-cls-running.json"  # while a fit runs: its pid and host, for `qwen-cls report`
_VERSIONED = ("torch", "lightning", "transformers", "deepspeed", "qwen-cls")


RUN_ID_ENV = "QWEN_CLS_RUN_ID"  # inherited by the processes Lightning starts for the other ranks


def _marker_owner(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the marker's process runs (on another host it cannot be told, so it counts as running)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True


def describe_owner(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {started}"


def refuse_if_running(output_dir: str | Path) -> None:
    """One line naming the other ``fit`` that trains into ``output_dir`` (its own processes excepted)."""
    marker = Path(output_dir) / RUNNING_FILE
    owner = _marker_owner(marker) if marker.is_file() else None
    if owner is None or owner.get("run_id") == os.environ.get(RUN_ID_ENV) or not _alive(owner):
        return
    elsewhere = owner.get("host") != socket.gethostname()
    raise ConfigError(
        f"training.output_dir: {output_dir} is being trained by another qwen-cls fit ({describe_owner(owner)}); "
        "wait for it, stop it, or choose another output_dir"
        + (f" (if that run is gone, delete {marker})" if elsewhere else "")
    )


@contextlib.contextmanager
def marked_running(output_dir: str | Path, write: bool):
    """Claim ``output_dir`` for this run until the block ends, however it ends. The marker is created
    atomically, so of two runs started at once one is refused; a marker whose process is gone (on this
    host) is taken over with a warning, and ``report`` reads a leftover one as a killed run."""
    marker = Path(output_dir) / RUNNING_FILE
    inherited = os.environ.get(RUN_ID_ENV)  # set when Lightning started this process as another rank
    run_id = os.environ[RUN_ID_ENV] = inherited or uuid.uuid4().hex
    if write:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "run_id": run_id}
        try:
            with marker.open("x") as fh:
                fh.write(json.dumps(owner))
        except FileExistsError:
            refuse_if_running(output_dir)
            old = _marker_owner(marker) or {}
            if old.get("run_id") != run_id:
                rank_zero_warn(f"{output_dir}: taking over from a run that is gone ({describe_owner(old)})")
            marker.write_text(json.dumps(owner))
    try:
        yield
    finally:
        if write and (_marker_owner(marker) or {}).get("run_id") == run_id:
            marker.unlink(missing_ok=True)
        if inherited is None:  # the next run in this process (a notebook, a sweep) is another run
            os.environ.pop(RUN_ID_ENV, None)


def run_status(output_dir: str | Path, checkpoints: list[Path]) -> str:
    """``finished``, ``in progress``, ``stopped by SIGTERM`` (or SIGINT; a checkpoint of the step it stopped
    at was saved) or ``stopped`` (killed or crashed before its final checkpoint)."""
    last = json.loads((checkpoints[-1] / INFO_FILE).read_text()) if checkpoints else {}
    if last.get("final"):
        return "finished"
    marker = Path(output_dir) / RUNNING_FILE
    owner = _marker_owner(marker) if marker.is_file() else None
    if owner is not None and _alive(owner):
        elsewhere = owner.get("host") != socket.gethostname()
        return f"in progress on {owner['host']} (or killed there)" if elsewhere else "in progress"
    if last.get("stopped_by"):
        return f"stopped by {last['stopped_by']}"
    return "stopped"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, or None for anything else."""
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def is_complete(path: Path) -> bool:
    return (path / INFO_FILE).is_file() and (path / HF_DIR).is_dir() and (path / STATE_DIR).exists()


def scan_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Complete checkpoint folders of a run in step order, and the incomplete ones with what is wrong."""
    found, incomplete = [], []
    for leftover in sorted(Path(output_dir).glob(f".{CHECKPOINT_PREFIX}*.tmp")):
        incomplete.append((leftover, "the temporary folder of a save that did not finish"))
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if not is_complete(path):
            missing = [n for n in (INFO_FILE, HF_DIR, STATE_DIR) if not (path / n).exists()]
            why = f"incomplete checkpoint folder (no {', '.join(missing)})"
            if missing == [HF_DIR] and (path / STATE_DIR / "latest").is_file():
                why += (
                    f"; rebuild it from the DeepSpeed shards with: qwen-cls export --checkpoint_path {path}"
                )
            incomplete.append((path, why))
            continue
        found.append((step, path))
    return [p for _, p in sorted(found)], incomplete


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, in step order; incomplete ones are skipped with a warning."""
    complete, incomplete = scan_checkpoints(output_dir)
    for path, why in incomplete:
        rank_zero_warn(f"skipping {path}: {why}")
    return complete


def checkpoint_bytes(net: torch.nn.Module) -> int:
    """Estimated size of one checkpoint folder: ``hf_model/`` (weights in their dtype) plus the resumable
    state (weights, AdamW's two fp32 moments, an fp32 master copy when the weights are not fp32). Under
    DeepSpeed the state is split into one shard per rank; the total in output_dir is the same."""

    def numel(p: torch.Tensor) -> int:  # a ZeRO-3 partition's placeholder is empty; ds_numel is the whole
        return getattr(p, "ds_numel", p.numel())

    weights = sum(numel(p) * p.element_size() for p in net.parameters())
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = sum(numel(p) * (8 if p.dtype == torch.float32 else 12) for p in trainable)
    return 2 * weights + optimizer


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def refuse_unsafe_checkpoint(what: str):
    """torch.load(weights_only=True) refuses a checkpoint holding arbitrary objects; say so in one line."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what} cannot be loaded safely: {str(e).splitlines()[0]}") from None


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


ASIDE_SUFFIX = ".replaced"


def replace_folder(new: Path, final: Path) -> None:
    """``new`` becomes ``final``; an existing ``final`` (a step saved again after resuming from an earlier
    checkpoint) is renamed aside first and deleted last, so a kill at any moment leaves one whole copy."""
    if not final.exists():
        os.replace(new, final)
        return
    aside = final.parent / f".{final.name}{ASIDE_SUFFIX}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(new, final)
    shutil.rmtree(aside)


def restore_set_aside(output_dir: str | Path) -> list[Path]:
    """Put back a checkpoint that a kill caught set aside by :func:`replace_folder` (its replacement never
    arrived); drop one whose replacement did. Returns the folders restored."""
    restored = []
    for aside in Path(output_dir).glob(f".{CHECKPOINT_PREFIX}*{ASIDE_SUFFIX}"):
        final = aside.parent / aside.name[1 : -len(ASIDE_SUFFIX)]
        try:
            if final.exists():
                shutil.rmtree(aside)
            else:
                os.replace(aside, final)
                restored.append(final)
        except OSError:  # another rank of the same run did it first
            continue
    return restored


def resume_state_path(checkpoint: str | Path, deepspeed: bool) -> str:
    """What ``Trainer.fit(ckpt_path=...)`` needs for a checkpoint folder: DeepSpeed's directory, or the file."""
    state = Path(checkpoint) / STATE_DIR
    return str(state if deepspeed else state / STATE_FILE)


class QwenCheckpoint(ModelCheckpoint):
    """Writes the checkpoint folders every ``every_n_train_steps`` optimizer steps and at the last step.

    With a ``monitor`` (standard mode with best-model tracking) a save step's checkpoint is written at the
    end of that step's validation, so it is ranked by an evaluation of its own weights; with
    ``keep_best_only`` only the best checkpoint and the latest one (to resume from) are kept, and
    ``best_checkpoint.json`` names the best.
    """

    FILE_EXTENSION = ""

    def __init__(
        self,
        dirpath: str,
        run_info: dict[str, Any] | None = None,
        keep_best_only: bool = False,
        keep_last_n: int | None = None,
        disk_check: str = "error",
        **kwargs: Any,
    ):
        super().__init__(
            dirpath=dirpath,
            filename=CHECKPOINT_PREFIX + "{step}",
            auto_insert_metric_name=False,
            save_last=False,
            save_on_train_epoch_end=False,
            **kwargs,
        )
        self.run_info = run_info or {}
        self.keep_best_only = keep_best_only
        self.keep_last_n = keep_last_n
        if disk_check not in ("error", "warn", "off"):
            raise ConfigError(f"training.disk_check: {disk_check!r}; choose error, warn or off")
        if keep_last_n is not None and keep_last_n < 1:
            raise ConfigError(f"training.keep_last_n: must be >= 1, got {keep_last_n}")
        self.disk_check = disk_check
        self._saved: list[str] = []
        self._elapsed_before = 0.0
        self._elapsed_at_save = 0.0  # training time when the latest save began (a resume continues from it)
        self._started = time.monotonic()
        self._at_train_end = False
        self.stopped_by: str | None = None  # the signal that stopped the run, recorded in training_info.json

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_best_metric_has_rows(trainer)
        if self.disk_check != "off":
            self._check_disk_space(trainer)
        self._started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif trainer.global_step % self._every_n_train_steps == 0 and not self._should_skip_saving_checkpoint(
            trainer
        ):
            self._defer_save_until_validation = True  # Lightning's own flag: saved in on_validation_end

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """SIGTERM (what SLURM and Kubernetes send on preemption or time-out; Lightning stops every rank at the
        same step boundary) or SIGINT: save a complete checkpoint of the current step, so nothing trained is
        lost; the process then exits non-zero."""
        name = {SIGTERMException: "SIGTERM", KeyboardInterrupt: "SIGINT"}.get(type(exception))
        if name is None or trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        self.stopped_by = name
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))
        say(
            f"stopped by {name} at step {trainer.global_step}: {CHECKPOINT_PREFIX}{trainer.global_step} is complete; "
            "resume with --ckpt_path last"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The last step is always saved, whatever ``save_steps`` is: it is the one to resume from."""
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._at_train_end = True
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        """Silenced: ``qwen-cls fit`` refuses an output_dir with checkpoints unless resuming or overwriting."""

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        """Lightning takes the step for the folder name from a logged "step" metric when there is one; the
        name must be the optimizer step whatever was (or was not) logged."""
        return {**super()._monitor_candidates(trainer), "step": torch.tensor(trainer.global_step)}

    def _get_metric_interpolated_filepath_name(self, monitor_candidates, trainer, del_filepath=None) -> str:
        """One folder per step: a re-run of a step (after a resume) replaces it instead of adding ``-v1``."""
        return self.format_checkpoint_name(monitor_candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        tmp = final.parent / f".{final.name}.tmp"
        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        trainer.strategy.barrier("qwen_cls_checkpoint_start")
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        trainer.lightning_module.raise_if_nonfinite()  # never a checkpoint of weights a NaN step wrecked
        self._elapsed_at_save = self.elapsed_seconds()  # one value for the state and training_info.json
        trainer.save_checkpoint(resume_state_path(tmp, deepspeed), self.save_weights_only)
        loss = trainer.lightning_module.take_loss("save")  # the mean since the previous save, all ranks
        weights = None
        if zero_stage_3(trainer.strategy):  # every rank takes part in gathering the partitions
            weights = gathered_state_dict(trainer.lightning_module.net, keep=trainer.is_global_zero)
        if trainer.is_global_zero:
            self._write_hf_model(trainer, tmp / HF_DIR, weights)
            self._write_info(trainer, tmp / INFO_FILE, None if loss is None else float(loss))
            replace_folder(tmp, final)
        self._apply_retention(trainer, final)
        trainer.strategy.barrier("qwen_cls_checkpoint_end")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(final)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _apply_retention(self, trainer: L.Trainer, latest: Path) -> None:
        """Keep what the config asks for: the best plus the latest (``keep_best_only``), or the newest
        ``keep_last_n`` plus the best; record the best in ``best_checkpoint.json``."""
        self._saved = [p for p in self._saved if p != str(latest)] + [str(latest)]
        keep = {str(latest), self.best_model_path} if self.monitor else {str(latest)}
        if self.keep_best_only:
            doomed = [p for p in self._saved if p not in keep]
        elif self.keep_last_n:
            doomed = [p for p in self._saved[: -self.keep_last_n] if p not in keep]
        else:
            doomed = []
        for path in doomed:
            self._saved.remove(path)
            self.best_k_models.pop(path, None)
            self._remove_checkpoint(trainer, path)
        if trainer.is_global_zero and self.monitor and self.best_model_path:
            best = Path(self.best_model_path)
            record = {
                "checkpoint": best.name,
                "step": checkpoint_step(best),
                "metric": self.monitor.removeprefix("eval/"),
                "mode": self.mode,
                "value": float(self.best_model_score),
            }
            (Path(self.dirpath) / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def _check_best_metric_has_rows(self, trainer: L.Trainer) -> None:
        """Before step 1: a best-model metric of one dataset needs validation rows of that dataset, or the
        first save (hours in) would find no value to rank by."""
        rows = getattr(trainer.datamodule, "val_rows", None)
        if not self.monitor or rows is None:
            return
        metric = self.monitor.removeprefix("eval/")
        names = trainer.lightning_module.dataset_names
        for idx, name in enumerate(names):
            if metric in (f"{name}_accuracy", f"{name}_loss", f"{name}_top5_accuracy"):
                if not any(row.dataset_idx == idx for row in rows):
                    raise ConfigError(
                        f"best_model_tracking.metric: {metric} needs validation rows of dataset {name!r}, but "
                        "data.val_jsonl has none; choose an overall_* metric or add its rows"
                    )

    def _check_disk_space(self, trainer: L.Trainer) -> None:
        """Before step 1: the checkpoints this run will keep must fit in the free space at ``dirpath``."""
        size = checkpoint_bytes(trainer.lightning_module.net)
        kept = self.checkpoints_to_keep(trainer)
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dirpath).free
        enough = trainer.strategy.reduce_boolean_decision(kept * size * 1.05 <= free, all=True)
        if enough:
            return
        fits = max(1, int(free // (size * 1.05)) - 1)
        message = (
            f"training.disk_check: this run will keep {kept} checkpoints of ~{_gib(size)} each ({_gib(kept * size)}) "
            f"in {self.dirpath}, but only {_gib(free)} is free; set training.keep_last_n (e.g. {fits}) to keep "
            "fewer, free some space, or set training.disk_check: warn"
        )
        if self.disk_check == "error":
            raise DiskSpaceError(message)
        rank_zero_warn(message)

    def checkpoints_to_keep(self, trainer: L.Trainer) -> int:
        """How many checkpoint folders this run will write from now on and keep at the same time."""
        total, done = int(trainer.estimated_stepping_batches), trainer.global_step
        every = self._every_n_train_steps
        saves = total // every - done // every + (1 if total % every else 0)
        if self.keep_best_only:
            return min(saves, 2)
        if self.keep_last_n:
            return min(saves, self.keep_last_n + (1 if self.monitor else 0))
        return saves

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero and Path(filepath).is_dir():
            shutil.rmtree(filepath)

    @staticmethod
    def _write_hf_model(trainer: L.Trainer, path: Path, weights: dict[str, torch.Tensor] | None) -> None:
        trainer.lightning_module.net.save_pretrained(path, state_dict=weights)
        processor = getattr(trainer.datamodule, "processor", None)
        if processor is not None:
            processor.save_pretrained(path)

    def _write_info(self, trainer: L.Trainer, path: Path, train_loss: float | None) -> None:
        module = trainer.lightning_module
        info = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "samples_seen": module.samples_seen,
            "skipped_steps": module.skipped_steps,
            "skipped_images": module.skipped_images,
            "train_loss": train_loss,
            "learning_rate": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            "elapsed_seconds": round(self._elapsed_at_save, 3),
            "final": not self.stopped_by
            and (self._at_train_end or trainer.global_step >= trainer.estimated_stepping_batches),
            "stopped_by": self.stopped_by,
            "total_steps": int(trainer.estimated_stepping_batches),
            "world_size": trainer.world_size,
            "device": describe_device(module.device),
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "versions": library_versions(),
            **self.run_info,
        }
        if module.last_eval_step == trainer.global_step and module.last_eval_metrics:
            info["eval_metrics"] = module.last_eval_metrics
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                info["wandb"] = {
                    "id": run.id,
                    "project": run.project,
                    "entity": run.entity,
                    "dir": logger.save_dir,
                }
        path.write_text(json.dumps(info, indent=2, default=str) + "\n")

    def elapsed_seconds(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "elapsed_seconds": self._elapsed_at_save, "saved": list(self._saved)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._elapsed_before = state_dict.get("elapsed_seconds", 0.0)
        self._saved = list(state_dict.get("saved", []))


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

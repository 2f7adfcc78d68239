"""Checkpoints as folders: ``checkpoint-<step>/{deepspeed/, hf_model/, training_info.json}``.

A ``ModelCheckpoint`` subclass, so Lightning's scheduling (``every_n_train_steps``), top-k retention and
the strategy's own saving (DeepSpeed's sharded engine state, or the Lightning checkpoint on one device)
are reused as they are. A checkpoint is written into a hidden temporary folder and renamed into place
only once its parts are complete, ``training_info.json`` last: a folder named ``checkpoint-<step>`` is
always whole. ``hf_model/`` and ``training_info.json`` make a checkpoint complete (every tool reads those);
the resumable state ``deepspeed/`` may be kept only in the newest ones (``training.keep_state_last_n``).
The files are written in the background by default (:mod:`qwen_cls.saving`).
"""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qwen_cls.config import DiskCheck, SaveDtype
from qwen_cls.console import say
from qwen_cls.errors import CheckpointError, ConfigError, DiskSpaceError
from qwen_cls.flops import describe_device
from qwen_cls.loading import save_dtype
from qwen_cls.lora import ADAPTER_DIR, adapter_items, merged_items, scaling, write_adapter
from qwen_cls.retention import Retention, gib
from qwen_cls.run_dir import (
    CHECKPOINT_PREFIX,
    HF_DIR,
    INFO_FILE,
    STATE_DIR,
    BestRecord,
    CheckpointInfo,
    checkpoint_step,
    drop_state,
    has_state,
    library_versions,
    replace_folder,
    resume_state_path,
    scan_checkpoints,
    write_best,
    write_info,
)
from qwen_cls.saving import (
    BackgroundWriter,
    HostCheckpointIO,
    SaveFiles,
    checkpoint_bytes,
    mark_done,
    use_host_checkpoint_engine,
    wait_for_ranks,
    write_hf_model,
)
from qwen_cls.step_axis import STEP
from qwen_cls.strategy import gathered_state_dict, zero_stage_3


class QwenCheckpoint(ModelCheckpoint):
    """Writes the checkpoint folders every ``every_n_train_steps`` optimizer steps and at the last step.

    With a ``monitor`` (standard mode with best-model tracking) a save step's checkpoint is written at the
    end of that step's validation, so it is ranked by an evaluation of its own weights; with
    ``keep_best_only`` only the best checkpoint and the latest one (to resume from) are kept, and
    ``best_checkpoint.json`` names the best. ``keep_state_last_n`` keeps the resumable state in the newest
    N checkpoints only (and in the best, whose state the final evaluation reads). With ``background_save``
    the files are written while training goes on (:mod:`qwen_cls.saving`); the next save, the end of
    training and a stop wait for them.
    """

    FILE_EXTENSION = ""

    def __init__(
        self,
        dirpath: str,
        run_info: dict[str, Any] | None = None,
        keep_best_only: bool = False,
        keep_all: bool = False,
        keep_last_n: int | None = None,
        keep_state_last_n: int | None = None,
        save_dtype: SaveDtype = "auto",
        background_save: bool = True,
        disk_check: DiskCheck = "error",
        save_adapter: bool = False,
        every_n_train_steps: int = 500,
        **kwargs: Any,
    ):
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            filename=CHECKPOINT_PREFIX + "{step}",
            auto_insert_metric_name=False,
            save_last=False,
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # one folder per step: a re-run of a step (a resume) replaces it, no -v1
            **kwargs,
        )
        self.run_info = run_info or {}
        self.save_steps = every_n_train_steps  # training.save_steps, as the resolver passed it
        self.retention = Retention(
            keep_best_only, keep_all, keep_last_n, keep_state_last_n, tracking=self.monitor is not None
        )
        self.save_dtype = save_dtype
        self.save_adapter = save_adapter
        self._dtype: torch.dtype | None = None
        self.disk_check = disk_check
        self.background_save = background_save
        self._background = background_save  # off once the run is stopping: its last save is written at once
        self._files = SaveFiles()
        self._writer = BackgroundWriter()
        self._saved: list[str] = []
        self._elapsed_before = 0.0
        self._elapsed_at_save = 0.0  # training time when the latest save began (a resume continues from it)
        self._started = time.monotonic()
        self._at_train_end = False
        self.stopped_by: str | None = None  # the signal that stopped the run, recorded in training_info.json
        self._stop_started: float | None = None  # when StopOnSignal decided to stop (the save time said)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._dtype = save_dtype(self.save_dtype, str(trainer.precision))
        if stage == "fit" and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = HostCheckpointIO(self._files)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            use_host_checkpoint_engine(trainer.strategy.deepspeed_engine, self._files)
        self._check_best_metric_has_rows(trainer)
        if self.disk_check != "off":
            self._check_disk_space(trainer)
        self._started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif trainer.global_step % self.save_steps == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._defer_save_until_validation = True  # Lightning's own flag: saved in on_validation_end

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """SIGTERM (what SLURM and Kubernetes send on preemption or time-out; Lightning stops every rank at the
        same step boundary) or SIGINT: save a complete checkpoint of the current step, so nothing trained is
        lost; the process then exits non-zero. Any other error: the save in flight is finished first."""
        self._background = False
        name = {SIGTERMException: "SIGTERM", KeyboardInterrupt: "SIGINT"}.get(type(exception))
        if name is None or trainer.state.fn != "fit" or trainer.global_step == 0:
            self._finish_writing(trainer, collective=False)
            return
        started = self._stop_started or time.monotonic()
        self.save_for_stop(trainer, name)
        self._finish_writing(trainer, collective=False)
        # how long the grace period had to be (a save in flight, then this one): what a --signal lead must cover
        say(
            f"stopped by {name} at step {trainer.global_step}: {CHECKPOINT_PREFIX}{trainer.global_step} is complete "
            f"({time.monotonic() - started:.1f} s after the signal); resume with --ckpt_path last"
        )

    def save_for_stop(self, trainer: L.Trainer, name: str, signalled_at: float | None = None) -> None:
        """The checkpoint of the step a signal stops at, marked ``stopped_by``; written at once, not in the
        background. :class:`qwen_cls.stop_signal.StopOnSignal` calls it in ``on_train_batch_end``, where a periodic
        save happens, so the loops' state in it is a periodic save's (a save after the step's end, in
        ``on_exception``, resumed one epoch late at an epoch's last batch)."""
        self._background = False
        self._stop_started = self._stop_started or signalled_at or time.monotonic()
        self.stopped_by = name
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The last step is always saved, whatever ``save_steps`` is: it is the one to resume from; training
        ends once it is written."""
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._at_train_end = True
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))
        self._finish_writing(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """The epoch counters as a periodic save in the middle of a normal run writes them: epoch ``E`` in
        progress (``E`` counted from the batches trained, not from Lightning's counters, which are off by one in
        three places, each measured: a run that ``max_steps`` stopped within an epoch counted it completed, so an
        extended resume skipped the rest of it; a stop at an epoch's last batch counted it completed beside a
        whole epoch's batch count, so the resume skipped an epoch; and after resuming from a save at an epoch's
        last batch Lightning runs the next epoch without counting it started, so the save after that said the
        previous epoch and the next resume shuffled with the wrong epoch). A save after the last batch's end (a
        stop) also counts that batch as a periodic save does, which Lightning resumes exactly."""
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = loops.get("epoch_progress"), loops.get("epoch_loop.batch_progress")
        per_epoch = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if not (epochs and batches and isinstance(per_epoch, int) and 0 < done <= per_epoch):
            return
        epoch = (batches["total"]["ready"] - done) // per_epoch
        for counts in (epochs["current"], epochs["total"]):
            counts.update(ready=epoch + 1, started=epoch + 1, processed=epoch, completed=epoch)
        checkpoint["epoch"] = epoch
        if done == per_epoch and batches["current"]["completed"] == done:
            for counts in (batches["current"], batches["total"]):
                counts["completed"] -= 1
            state = loops.get("epoch_loop.state_dict", {})
            if "_batches_that_stepped" in state:
                state["_batches_that_stepped"] -= 1

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._writer.close()

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        """Silenced: ``qwen-cls fit`` refuses an output_dir with checkpoints unless resuming or overwriting."""

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        """Lightning takes the step for the folder name from the logged step metric (:mod:`qwen_cls.step_axis`)
        when there is one; the name must be the optimizer step whatever was (or was not) logged."""
        return {**super()._monitor_candidates(trainer), STEP: torch.tensor(trainer.global_step)}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Everything the checkpoint of this step holds is taken now (host copies when written in the
        background); the files are written by :meth:`_write`."""
        self._finish_writing(trainer)  # at most one save in flight: the one before is complete first
        final = Path(filepath)
        tmp = final.parent / f".{final.name}.tmp"
        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        trainer.strategy.barrier("qwen_cls_checkpoint_start")
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        module = trainer.lightning_module
        module.raise_if_nonfinite()  # never a checkpoint of weights a NaN step wrecked
        self._elapsed_at_save = self.elapsed_seconds()  # one value for the state and training_info.json
        doomed, stateless = self._retention_plan(final)  # before the state is taken: it records what is kept
        background = self._background
        with self._files.collect(defer=background) as state_files:
            trainer.save_checkpoint(resume_state_path(tmp, deepspeed), self.save_weights_only)
            loss = module.take_loss("save")  # the mean since the previous save, all ranks
            weights, adapter = self._hf_weights(trainer, copy=background)
        self._files.release()
        info = best = processor = None
        if trainer.is_global_zero:
            info = self._info(trainer, None if loss is None else float(loss))
            best = self._best_record()
            processor = getattr(trainer.datamodule, "processor", None)
        job = partial(
            self._write,
            state_files,
            tmp,
            final,
            (trainer.global_rank, trainer.world_size),
            (module.net, weights, processor, adapter),
            info,
            best,
            doomed + [f"{p}/{STATE_DIR}" for p in stateless],
        )
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(final)
        if background:
            self._writer.submit(final.name, job)
            return
        job()
        trainer.strategy.barrier("qwen_cls_checkpoint_end")
        self._after_save(trainer)

    def _write(self, state_files, tmp: Path, final: Path, rank, model, info, best, doomed: list[str]) -> None:
        """This rank's files of one save; then global rank 0 (the one with ``info``) waits until every rank's
        are written, writes ``training_info.json``, renames the folder into place and deletes what retention
        no longer keeps (only now that the newer checkpoint is complete)."""
        (global_rank, world_size), (net, weights, processor, adapter) = rank, model
        try:
            for write in state_files:
                write()
            if info is not None:
                write_hf_model(tmp / HF_DIR, net, weights, self._dtype, processor)
                if adapter is not None:
                    write_adapter(tmp / ADAPTER_DIR, *adapter)
        except BaseException as e:
            mark_done(tmp, global_rank, failure=f"{type(e).__name__}: {e}")
            raise
        mark_done(tmp, global_rank)
        if info is None:
            return
        wait_for_ranks(tmp, world_size)
        write_info(tmp / INFO_FILE, info)
        replace_folder(tmp, final)
        for path in map(Path, doomed):
            if path.name == STATE_DIR:
                drop_state(path.parent)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if best is not None:
            write_best(final.parent, best)

    def _finish_writing(self, trainer: L.Trainer, collective: bool = True) -> None:
        """Wait for the save in flight. A failed write stops the run on every rank with one line (``collective``:
        the ranks agree in one all-reduce, at save steps only); while the run is already stopping, a warning."""
        name, error = self._writer.wait()
        if name is not None and error is None:
            self._after_save(trainer)
        failed = error is not None
        if collective and self.background_save and trainer.world_size > 1:
            failed = not trainer.strategy.reduce_boolean_decision(not failed, all=True)
        if not failed:
            return
        message = (
            f"{name}: writing the checkpoint failed: {type(error).__name__}: {error}"
            if error is not None
            else "a checkpoint write failed on another rank"
        )
        resumable = [p for p in scan_checkpoints(self.dirpath)[0] if has_state(p)] if self.dirpath else []
        message += (
            f"; the checkpoints before it are complete (resume from {resumable[-1].name} with --ckpt_path last)"
            if resumable
            else "; no checkpoint of this run is complete yet (free the space and start it again)"
        )
        if not collective:
            rank_zero_warn(message)
            return
        raise CheckpointError(message) from None

    def _after_save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _hf_weights(
        self, trainer: L.Trainer, copy: bool
    ) -> tuple[dict[str, torch.Tensor] | None, tuple | None]:
        """``hf_model/``'s weights at this step, in the save dtype: ZeRO-3 partitions gathered by every rank;
        host copies on global rank 0 (None: the module's own, read when written). With LoRA, the merged
        weights, and with ``save_adapter`` the adapter's config and weights for ``adapter/``."""
        module = trainer.lightning_module
        net, lora = module.net, module.lora
        if not lora.enabled:
            if zero_stage_3(trainer.strategy):
                return gathered_state_dict(net, keep=trainer.is_global_zero, dtype=self._dtype), None
            if not trainer.is_global_zero or not (copy or self._dtype is not None):
                return None, None
            return {
                name: self._files.copy(tensor, self._dtype) for name, tensor in net.state_dict().items()
            }, None
        if zero_stage_3(trainer.strategy):
            state = gathered_state_dict(net, keep=trainer.is_global_zero)
        else:
            state = net.state_dict() if trainer.is_global_zero else {}
        if not trainer.is_global_zero:
            return None, None
        weights = {name: self._files.copy(t, self._dtype) for name, t in merged_items(state, scaling(lora))}
        adapter = None
        if self.save_adapter:
            config = module.peft_model.peft_config["default"]
            full = config.modules_to_save
            adapter = (config, {name: self._files.copy(t) for name, t in adapter_items(state, full)})
        return weights, adapter

    def _retention_plan(self, latest: Path) -> tuple[list[str], list[str]]:
        """What to delete once ``latest`` is complete (:meth:`Retention.after_save`): whole folders, and the
        resumable state of others. Folders are remembered by name, so a run copied elsewhere and resumed never
        touches the original."""
        best = Path(self.best_model_path).name if self.best_model_path else None
        plan = self.retention.after_save(self._saved, latest.name, best)
        self._saved = plan.saved
        for name in plan.delete:
            self.best_k_models.pop(str(latest.parent / name), None)
        return [str(latest.parent / n) for n in plan.delete], [
            str(latest.parent / n) for n in plan.drop_state
        ]

    def _best_record(self) -> BestRecord | None:
        if not (self.monitor and self.best_model_path):
            return None
        best = Path(self.best_model_path)
        return BestRecord(
            checkpoint=best.name,
            step=checkpoint_step(best),
            metric=self.monitor.removeprefix("eval/"),
            mode=self.mode,
            value=float(self.best_model_score),
        )

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
                if not (rows.dataset_idx == idx).any():
                    raise ConfigError(
                        f"best_model_tracking.metric: {metric} needs validation rows of dataset {name!r}, but "
                        "data.val_jsonl has none; choose an overall_* metric or add its rows"
                    )

    def _check_disk_space(self, trainer: L.Trainer) -> None:
        """Before step 1: the checkpoints this run will keep must fit in the free space at ``dirpath``."""
        hf, state = checkpoint_bytes(trainer.lightning_module.net, self._dtype)
        total, done, every = (
            int(trainer.estimated_stepping_batches),
            trainer.global_step,
            self.save_steps,
        )
        kept = self.retention.folders_kept(total // every - done // every + (1 if total % every else 0))
        states = self.retention.states_kept(kept)
        need = kept * hf + states * state
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dirpath).free
        enough = trainer.strategy.reduce_boolean_decision(need * 1.05 <= free, all=True)
        if enough:
            return
        message = (
            f"training.disk_check: this run will keep {kept} checkpoints (hf_model/ ~{gib(hf)} each, {states} "
            f"resumable states of ~{gib(state)}): {gib(need)} in {self.dirpath}, but only {gib(free)} is free; "
            + "; or ".join(self.retention.disk_remedies(kept, hf, state, free))
            + "; or free some space, or set training.disk_check: warn"
        )
        if self.disk_check == "error":
            raise DiskSpaceError(message)
        rank_zero_warn(message)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero and Path(filepath).is_dir():
            shutil.rmtree(filepath)

    def _info(self, trainer: L.Trainer, train_loss: float | None) -> CheckpointInfo:
        module = trainer.lightning_module
        info = CheckpointInfo(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            samples_seen=module.samples_seen,
            skipped_steps=module.skipped_steps,
            skipped_images=module.skipped_images,
            train_loss=train_loss,
            learning_rate=trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            elapsed_seconds=round(self._elapsed_at_save, 3),
            final=not self.stopped_by
            and (self._at_train_end or trainer.global_step >= trainer.estimated_stepping_batches),
            stopped_by=self.stopped_by,
            total_steps=int(trainer.estimated_stepping_batches),
            world_size=trainer.world_size,
            device=describe_device(module.device),
            strategy=type(trainer.strategy).__name__,
            precision=str(trainer.precision),
            hf_model_dtype=str(self._dtype or next(module.net.parameters()).dtype).removeprefix("torch."),
            versions=library_versions(),
            **self.run_info,
        )
        if module.last_eval_step == trainer.global_step and module.last_eval_metrics:
            info.eval_metrics = dict(module.last_eval_metrics)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                info.wandb = {
                    "id": run.id,
                    "project": run.project,
                    "entity": run.entity,
                    "dir": logger.save_dir,
                }
        return info

    def elapsed_seconds(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "elapsed_seconds": self._elapsed_at_save, "saved": list(self._saved)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._elapsed_before = state_dict.get("elapsed_seconds", 0.0)
        self._saved = [Path(p).name for p in state_dict.get("saved", [])]

"""SIGTERM on several processes: every rank stops at the same step, wherever in the step the signal lands.

Lightning 2.6's own handler broadcasts a tensor inside the signal handler, and each rank then stops on its own
flag at the end of its step. Under Slurm (SIGTERM to every task at once) that deadlocked: rank 1 in the
handler's broadcast, rank 0 inside backward's all-reduce waiting for rank 1 (a Python handler runs only
between bytecodes), until the time limit killed the job without a checkpoint. Here the handler only notes
the signal (and passes it to the processes Lightning's launcher started); at each logging step, where the
ranks already synchronise, one scalar all-reduce tells every rank whether any saw it, and all save that step
and stop together.
A stop therefore waits for the next logging step (``training.logging_steps``: seconds), far inside any
signal lead. One process keeps Lightning's handler, which is safe there.
"""

from __future__ import annotations

import signal
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

from qwen_cls.console import tell


class StopOnSignal(Callback):
    def __init__(self) -> None:
        self.seen = False
        self.signalled_at: float | None = None
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning registered its handlers (in ``Trainer._run``, before training starts): ours instead."""
        if trainer.world_size == 1:
            return
        self._trainer = trainer
        signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame) -> None:
        trainer = self._trainer
        if not self.seen:
            tell(f"rank {trainer.global_rank}: SIGTERM; the ranks stop together at the next logging step")
            launcher = trainer.strategy.launcher
            if launcher is not None:  # Lightning's launcher: its child processes get it too
                launcher.kill(signum)
            self.signalled_at = time.monotonic()
        self.seen = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._trainer is None or not pl_module.is_logging_step(trainer.global_step):
            return
        if trainer.strategy.reduce_boolean_decision(self.seen, all=False):
            # this step's checkpoint, saved here as a periodic save is; then Lightning's flag, on every rank at the
            # same step: each raises its SIGTERMException at the end of this step (QwenCheckpoint.on_exception
            # finds the checkpoint written and says so)
            trainer.checkpoint_callback.save_for_stop(trainer, "SIGTERM", self.signalled_at)
            trainer._signal_connector.received_sigterm = True

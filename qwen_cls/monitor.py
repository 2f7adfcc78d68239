"""Run monitoring helpers shared by training and evaluation."""

from __future__ import annotations

import datetime
import netrc
import os
import time

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def say(message: str) -> None:
    """One line to the user on stdout, from rank 0 only."""
    print(f"[qwen-cls] {message}", flush=True)


def wandb_online() -> bool:
    """Whether W&B can log online: a key in the environment or stored by ``wandb login`` (netrc), and
    ``WANDB_MODE`` not ``offline``. The key itself is never read into qwen-cls."""
    if os.environ.get("WANDB_MODE") == "offline":
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class LogLineProgress(ProgressBar):
    """Progress for logs (not a terminal): one plain line every ``every`` steps, no control characters.

    ``step 120/500 (24%) | epoch 0 | train/loss 1.234 | train/lr 1.9e-03 | 7.1 steps/s | ETA 0:00:54``
    """

    def __init__(self, every: int = 10):
        super().__init__()
        self.every = max(1, every)
        self._enabled = True
        self._started = 0.0
        self._first_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started, self._first_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if not self._enabled or not trainer.is_global_zero or (step % self.every and step != total):
            return
        rate = (step - self._first_step) / max(time.monotonic() - self._started, 1e-9)
        eta = datetime.timedelta(seconds=round((total - step) / rate)) if rate > 0 else "?"
        metrics = trainer.callback_metrics
        shown = " | ".join(f"{k} {float(metrics[k]):.4g}" for k in ("train/loss", "train/lr") if k in metrics)
        print(
            f"step {step}/{total} ({100 * step // max(total, 1)}%) | epoch {trainer.current_epoch} | {shown} | "
            f"{rate:.2f} steps/s | ETA {eta}",
            flush=True,
        )

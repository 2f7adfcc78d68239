"""Helpers that run inside the `qwen-cls fit` processes of tests: callbacks given in a test's YAML, and
scripts (`python -m tests.helpers FUNCTION ARGS`): a fit that then computes the trained module's logits on
every rank, a fit whose background write of one checkpoint waits for a signal file, a fit that counts each
process's start-up image checks."""

from __future__ import annotations

import os
import signal as signal_module
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Send ``signal`` once optimizer step ``step`` is done: to this process, or with ``group`` to its whole
    process group (every rank; SIGKILL then is a node lost without warning). A real signal at a step chosen
    exactly, rather than by a race with a timer."""

    def __init__(self, step: int, signal: str = "SIGKILL", group: bool = False):
        self.step, self.signum, self.group = step, getattr(signal_module, signal), group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not getattr(self, "_sent", False):
            self._sent = True
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


class PauseAtStep(Callback):
    """Wait after optimizer step ``step`` until ``resume_file`` exists (at most ``timeout`` seconds): a run
    that is certainly in progress while a test acts beside it. Lightning runs checkpoint callbacks after the
    others, so a checkpoint of ``step`` is written only after this pause; pause one step later for it."""

    def __init__(self, step: int, resume_file: str, timeout: float = 120.0):
        self.step, self.resume_file, self.timeout = step, Path(resume_file), timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            deadline = time.monotonic() + self.timeout
            while not self.resume_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def fit_and_save_logits(config: str, rows: str, out: str) -> None:
    """`qwen-cls fit --config CONFIG`, then the trained module's logits on the first 8 rows of ROWS, computed
    by every rank (under ZeRO-3 each forward gathers the partitions) and saved by rank 0 with the batch."""
    import torch

    from qwen_cls.cli import run_lightning_cli
    from qwen_cls.data import ImageRowsDataset
    from qwen_cls.rows import read_rows

    cli = run_lightning_cli(["fit", "--config", config])
    dataset = ImageRowsDataset(read_rows(rows, cli.datamodule.dataset_configs))
    batch = cli.datamodule.collator()([dataset[i] for i in range(8)])
    module = cli.model.eval()
    with torch.no_grad():
        logits = module({k: v.to(module.device) for k, v in batch.items()}).float().cpu()
    if cli.trainer.is_global_zero:
        torch.save({"logits": logits, "batch": batch}, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # gloo's threads would abort the interpreter's exit otherwise


def fit_with_a_held_write(config: str, step: str, gate: str) -> None:
    """`qwen-cls fit --config CONFIG` whose write of checkpoint STEP's hf_model/ (in the background) waits until
    the file GATE exists, after creating GATE.held: a kill while that write is certainly in flight."""
    import qwen_cls.checkpoint as checkpoint
    from qwen_cls.cli import main

    real = checkpoint.write_hf_model

    def held(path: Path, *args) -> None:
        if path.parent.name == f".checkpoint-{step}.tmp":
            Path(f"{gate}.held").touch()
            while not Path(gate).exists():
                time.sleep(0.05)
        real(path, *args)

    checkpoint.write_hf_model = held
    main(["fit", "--config", config])


def fit_counting_row_checks(config: str, out_dir: str) -> None:
    """`qwen-cls fit --config CONFIG` where every start-up image check appends its path to
    OUT_DIR/checks-rank<LOCAL_RANK> (the checking pool's processes count for the rank that started them)."""
    from qwen_cls import rows
    from qwen_cls.cli import main

    real = rows._check_image

    def counted(path: str, level: str) -> None:
        with open(Path(out_dir) / f"checks-rank{os.environ.get('LOCAL_RANK', '0')}", "a") as fh:
            fh.write(path + "\n")
        real(path, level)

    rows._check_image = counted
    main(["fit", "--config", config])


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])


STEP = {"current": 0}  # the optimizer step in progress, for tests that attribute calls to steps


class StepClock(Callback):
    """Keeps ``STEP["current"]`` at the optimizer step the batch in progress completes (0 outside training)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        STEP["current"] = trainer.global_step + 1

    def on_train_end(self, trainer, pl_module) -> None:
        STEP["current"] = 0

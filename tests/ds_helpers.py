"""Helpers that run inside `qwen-cls fit` subprocesses of the multi-process tests."""

from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch import Callback


class KillAtStep(Callback):
    """SIGKILL the whole process group (every rank) once optimizer step ``step`` is done: a node lost
    without warning, at a step chosen exactly rather than by a race with a timer."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def fit_and_save_logits(config: str, rows: str, out: str) -> None:
    """`qwen-cls fit --config CONFIG`, then the trained module's logits on the first 8 rows of ROWS, computed
    by every rank (under ZeRO-3 each forward gathers the partitions) and saved by rank 0 with the batch."""
    import torch

    from qwen_cls.cli import run_lightning_cli
    from qwen_cls.data import ImageRowsDataset, read_rows

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


if __name__ == "__main__":
    fit_and_save_logits(*sys.argv[1:])

"""What tests share: a user's small config (``base_config``), YAML writing, run logs, child processes; callbacks
given in a test's YAML, run inside the `qwen-cls fit` processes; and scripts (`python -m tests.helpers FUNCTION ARGS`): a fit that then computes the trained module's logits on
every rank, a fit whose background write of one checkpoint waits for a signal file, a fit that counts each
process's start-up image checks."""

from __future__ import annotations

import copy
import csv
import os
import signal as signal_module
import subprocess
import sys
import time
from pathlib import Path

import yaml
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


def base_config(tiny_model: Path, demo_data: Path, output_dir: Path) -> dict:
    """A small no-evaluation run on the demo data, as a user would write it."""
    return {
        "model": {"pretrained_name": str(tiny_model), "num_labels": 10},
        "loss": {"type": "cross_entropy"},
        "datasets": {"dataset_configs": {"mnist": {"num_classes": 10, "description": "handwritten digits"}}},
        "data": {
            "train_jsonl": str(demo_data / "train.jsonl"),
            "val_jsonl": str(demo_data / "val.jsonl"),
            "batch_size": 8,
            "num_workers": 0,
        },
        "training": {
            "epochs": 1,
            "max_steps": 12,
            "lr": 2e-3,
            "output_dir": str(output_dir),
            "logging_steps": 2,
            "save_steps": 5,
            "eval_steps": 3,
            "skip_evaluation": True,
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }


def write_config(path: Path, config: dict, **updates: dict) -> Path:
    """Write ``config`` with ``updates`` (section -> keys) merged in, as YAML."""
    config = copy.deepcopy(config)
    for section, values in updates.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def run_log(run: Path, name: str = "metrics.csv") -> Path:
    """The newest ``logs/version_N/<name>`` of a run (each start or resume writes its own version)."""
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] / name


# variables an in-process run of another test may have left; a child would reuse its port and ranks
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")


def child_env() -> dict[str, str]:
    """The environment for a multi-process child run."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def losses_by_step(run: Path) -> dict[int, float]:
    """``train/loss`` by optimizer step over every start of a run (a resume logs into its own version)."""
    losses = {}
    for log in sorted((run / "logs").glob("version_*/metrics.csv")):
        with log.open() as fh:
            losses.update(
                {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r["train/loss"]}
            )
    return losses


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`qwen-cls ARGS` through ``main`` (what the console script calls) in this process: exit code, stdout,
    stderr. A process of its own is for runs with several ranks and for the process itself under test."""
    from qwen_cls.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def start_qwen_cls(*args: str) -> subprocess.Popen:
    """`qwen-cls ARGS` as a separate, silent process (for runs a test watches or kills)."""
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_cls", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class SignalAtStep(Callback):
    """Send ``signal`` once optimizer step ``step`` is done: to this process, or with ``group`` to its whole
    process group (every rank; SIGKILL then is a node lost without warning). A real signal at a step chosen
    exactly, rather than by a race with a timer. With ``group``, global rank 0 sends it once the save in flight
    (written in the background) is complete, so that a test knows which checkpoints the kill left whole; a kill
    during a write has its own test (test_saving.py)."""

    def __init__(self, step: int, signal: str = "SIGKILL", group: bool = False):
        self.step, self.signum, self.group = step, getattr(signal_module, signal), group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or getattr(self, "_sent", False):
            return
        self._sent = True
        if not self.group:
            os.kill(os.getpid(), self.signum)
        elif trainer.global_rank == 0:
            from qwen_cls.checkpoint import QwenCheckpoint

            for callback in trainer.callbacks:
                if isinstance(callback, QwenCheckpoint):
                    callback._writer.wait()
            os.killpg(os.getpgid(0), self.signum)


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

    from qwen_cls.data import ImageRowsDataset
    from qwen_cls.rows import read_rows
    from qwen_cls.train import run_lightning_cli

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

"""The run folder: what a run writes and how every tool finds it, with no torch and no Lightning.

``output_dir/checkpoint-<step>/{deepspeed/, hf_model/, training_info.json}`` (complete once ``hf_model/`` and
``training_info.json`` are there), the records beside them (``best_checkpoint.json``, ``eval_all.*``, ``report.md``,
``plots/``, ``logs/``), the marker of a running fit, atomic replacement of a folder and what a kill left set aside.
The tools (evaluate, export, predict, report) read runs through it; :mod:`qwen_cls.checkpoint` writes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from qwen_cls.errors import CheckpointError, ConfigError

CHECKPOINT_PREFIX = "checkpoint-"
INFO_FILE = "training_info.json"
STATE_DIR = "deepspeed"  # the resumable state: DeepSpeed's shards, or on one device Lightning's state.ckpt
STATE_FILE = "state.ckpt"
HF_DIR = "hf_model"
BEST_FILE = "best_checkpoint.json"
RUNNING_FILE = ".qwen-cls-running.json"  # while a fit runs: its pid and host, for `qwen-cls report`
_VERSIONED = ("torch", "lightning", "transformers", "deepspeed", "qwen-cls")
RUN_ID_ENV = "QWEN_CLS_RUN_ID"  # inherited by the processes Lightning starts for the other ranks
ASIDE_SUFFIX = ".replaced"
# What a run leaves in its output_dir besides its checkpoint folders, written by: evaluate-all (eval_all.*,
# best_checkpoint.json), the final evaluation (eval_final.json), report, RunPlots (plots/) and the CSV logger
# (logs/). An overwritten run takes all of them along. Not wandb/: each W&B run is a folder of its own there,
# read by no tool as another run's, and an offline one may not have been uploaded yet.
CSV_FILE = "eval_all.csv"
PLOT_FILE = "eval_all.png"
CLASSES_FILE = "eval_all_classes.csv"  # evaluate-all's per-class results of every checkpoint
BEST_CLASSES_DIR = "eval_all_best"  # the best checkpoint's per-class CSV and confusion matrices
RUN_RECORDS = (
    CSV_FILE,
    PLOT_FILE,
    BEST_FILE,
    CLASSES_FILE,
    BEST_CLASSES_DIR,
    "eval_final.json",
    "report.md",
    "plots",
    "logs",
)
OVERWRITTEN_PREFIX = ".qwen-cls-overwritten-"


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


def live_owner(output_dir: str | Path) -> dict | None:
    """The running ``fit`` that holds ``output_dir`` (pid, host, start), or None when none does."""
    marker = Path(output_dir) / RUNNING_FILE
    owner = _marker_owner(marker) if marker.is_file() else None
    return owner if owner is not None and _alive(owner) else None


def run_status(output_dir: str | Path, checkpoints: list[Path]) -> str:
    """``finished``, ``in progress``, ``stopped by SIGTERM`` (or SIGINT; a checkpoint of the step it stopped
    at was saved) or ``stopped`` (killed or crashed before its final checkpoint)."""
    last = read_info(checkpoints[-1]) if checkpoints else None
    if last is not None and last.final:
        return "finished"
    owner = live_owner(output_dir)
    if owner is not None:
        elsewhere = owner.get("host") != socket.gethostname()
        return f"in progress on {owner['host']} (or killed there)" if elsewhere else "in progress"
    if last is not None and last.stopped_by:
        return f"stopped by {last.stopped_by}"
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
    return (path / INFO_FILE).is_file() and (path / HF_DIR).is_dir()


def has_state(path: Path) -> bool:
    """Whether a checkpoint keeps its resumable state (``training.keep_state_last_n`` drops older ones)."""
    return (path / STATE_DIR).is_dir()


def scan_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Complete checkpoint folders of a run in step order, and the incomplete ones with what is wrong."""
    found, incomplete = [], []
    for leftover in sorted(Path(output_dir).glob(f".{CHECKPOINT_PREFIX}*.tmp")):
        incomplete.append(
            (leftover, "the temporary folder of a save still being written or of one that did not finish")
        )
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if not is_complete(path):
            missing = [n for n in (INFO_FILE, HF_DIR) if not (path / n).exists()]
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


def check_new_folder(target: Path) -> None:
    """``--output``: a folder to write a model into must be absent or empty (one line otherwise)."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output: {target} is a file; give a folder to write the model into")
    if target.exists() and any(target.iterdir()):
        raise ConfigError(
            f"--output: {target} already exists and is not empty; remove it or choose another --output"
        )


@contextlib.contextmanager
def written_whole(target: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write into, renamed to ``target`` (absent or empty; with
    ``replace``, any: see :func:`replace_folder`) when the block ends; removed if it fails, so a failed write
    leaves nothing."""
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        replace_folder(tmp, target)
        return
    if target.exists():
        target.rmdir()
    os.replace(tmp, target)


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


def remove_previous_run(output_dir: str | Path) -> list[str]:
    """Everything of an earlier run in ``output_dir`` (checkpoints, leftovers of saves, :data:`RUN_RECORDS`),
    so that the tools never read its numbers as the new run's. Each entry is first renamed into one hidden
    folder, which is then deleted: a kill midway leaves the old run set aside there (deleted at the next
    start), never mixed with the new one. Returns what went, for the user."""
    output_dir = Path(output_dir)
    checkpoints = sorted(
        (p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None),
        key=checkpoint_step,
    )
    leftovers = [*output_dir.glob(f".{CHECKPOINT_PREFIX}*")]
    records = [output_dir / name for name in RUN_RECORDS if (output_dir / name).exists()]
    if not (checkpoints or leftovers or records):
        return []
    named = [p.name + ("/" if p.is_dir() else "") for p in records]
    aside = output_dir / f"{OVERWRITTEN_PREFIX}{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    for path in [*checkpoints, *leftovers, *records]:
        os.replace(path, aside / path.name)
    shutil.rmtree(aside)
    went = []
    if checkpoints:
        span = checkpoints[0].name + (f"..{checkpoints[-1].name}" if len(checkpoints) > 1 else "")
        went.append(f"{len(checkpoints)} checkpoint{'s' * (len(checkpoints) > 1)} ({span})")
    if leftovers:
        went.append(f"{len(leftovers)} unfinished save{'s' * (len(leftovers) > 1)}")
    return went + named


def drop_overwritten(output_dir: str | Path) -> None:
    """Delete what a kill left of :func:`remove_previous_run`: an old run set aside, never to be read."""
    for aside in Path(output_dir).glob(f"{OVERWRITTEN_PREFIX}*"):
        shutil.rmtree(aside, ignore_errors=True)


def resume_state_path(checkpoint: str | Path, deepspeed: bool) -> str:
    """What ``Trainer.fit(ckpt_path=...)`` needs for a checkpoint folder: DeepSpeed's directory, or the file."""
    state = Path(checkpoint) / STATE_DIR
    return str(state if deepspeed else state / STATE_FILE)


@dataclass
class CheckpointInfo:
    """``training_info.json``: what a checkpoint is (step, position in the data, the run's config and settings,
    where it ran). One schema, written by the checkpoint callback and read by every tool; a file of an older
    version lacks some fields (they read as None), and keys this version does not know are kept in ``extra``."""

    step: int
    epoch: int | None = None
    samples_seen: int | None = None
    skipped_steps: int | None = None
    skipped_images: int | None = None
    train_loss: float | None = None
    learning_rate: float | None = None
    elapsed_seconds: float | None = None
    final: bool = False
    stopped_by: str | None = None  # SIGTERM or SIGINT: a checkpoint of the step the run stopped at
    total_steps: int | None = None
    world_size: int | None = None
    device: str | None = None
    strategy: str | None = None
    precision: str | None = None
    hf_model_dtype: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config the run trained with
    overrides: list[str] = field(default_factory=list)  # what the resolver changed, as it was said
    eval_metrics: dict[str, float] | None = None  # the evaluation of this step's weights, in standard mode
    wandb: dict[str, Any] | None = None  # the W&B run (id, project, entity, dir) the metrics went to
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointInfo:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        optional = ("eval_metrics", "wandb")  # written only where there are some
        return {**{k: v for k, v in data.items() if v is not None or k not in optional}, **self.extra}

    def section(self, name: str) -> dict[str, Any]:
        """One section of the stored config (``model``, ``data``, ``wandb``, ...), ``{}`` when absent."""
        return dict(self.config.get(name) or {})


def write_info(path: Path, info: CheckpointInfo) -> None:
    path.write_text(json.dumps(info.to_json(), indent=2, default=str) + "\n")


def read_info(checkpoint: str | Path) -> CheckpointInfo:
    """A checkpoint's ``training_info.json`` (the one reader: evaluation, export, predict, report, resume)."""
    path = Path(checkpoint) / INFO_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; is {Path(checkpoint).name} a checkpoint folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint's save did not finish") from None
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        raise CheckpointError(f"{path}: not a training_info.json (no step)")
    return CheckpointInfo.from_json(data)


@dataclass
class BestRecord:
    """``best_checkpoint.json``: the best checkpoint of a run by one metric, one schema for both writers:
    training's best-model tracking (``source: training``, ranked on the validation rows during training) and
    ``evaluate-all`` (``source: evaluate-all``, on ``eval_data``)."""

    checkpoint: str
    step: int
    metric: str
    mode: str
    value: float
    source: str = "training"
    eval_data: str | None = None


def write_best(folder: str | Path, record: BestRecord) -> None:
    (Path(folder) / BEST_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")


def read_best(folder: str | Path) -> BestRecord | None:
    """The run's ``best_checkpoint.json``, or None when there is none."""
    path = Path(folder) / BEST_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return BestRecord(**{f.name: data[f.name] for f in fields(BestRecord) if f.name in data})


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """Of ``eval_all.csv``'s rows, the best by ``metric`` (``max`` or ``min``)."""
    scored = [r for r in rows if metric in r]
    if not scored:
        raise ConfigError(f"best_model_tracking.metric: no checkpoint has {metric!r}")
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def drop_state(checkpoint: Path) -> None:
    """Delete a checkpoint's resumable state; renamed away first, so a kill midway never leaves a partial
    state that looks resumable."""
    state, doomed = checkpoint / STATE_DIR, checkpoint / f".{STATE_DIR}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    if state.is_dir():
        os.replace(state, doomed)
        shutil.rmtree(doomed)

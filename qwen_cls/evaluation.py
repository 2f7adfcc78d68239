"""Evaluate one checkpoint, or every checkpoint of a run, on a JSONL file.

Both run the LightningModule's own ``validation_step`` through ``Trainer.validate``, so the numbers are
computed by exactly the code that evaluates during training. ``evaluate_all`` loads the data and the
processor once, evaluates the complete checkpoints in step order, and writes ``eval_all.csv``,
``eval_all.png`` and ``best_checkpoint.json``; with ``watch`` it follows a run that is still training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from qwen_cls.class_report import CLASS_COLUMNS, class_rows, weakest, write_confusion, write_csv
from qwen_cls.config import BestModelTrackingConfig, DatasetsConfig, RunConfig, WandbConfig
from qwen_cls.console import say
from qwen_cls.data import QwenDataModule
from qwen_cls.errors import ConfigError
from qwen_cls.eval_processes import EvalDevices, EvalProcesses
from qwen_cls.loading import refuse_unsafe_checkpoint
from qwen_cls.metrics import ClassScores
from qwen_cls.model import QwenClassifier
from qwen_cls.monitor import wandb_mode
from qwen_cls.policy import best_metric_names
from qwen_cls.run_dir import (
    BEST_CLASSES_DIR,
    CHECKPOINT_PREFIX,
    CLASSES_FILE,
    CSV_FILE,
    HF_DIR,
    INFO_FILE,
    PLOT_FILE,
    STATE_DIR,
    STATE_FILE,
    BestRecord,
    CheckpointInfo,
    best_row,
    checkpoint_step,
    describe_owner,
    list_checkpoints,
    live_owner,
    read_info,
    scan_checkpoints,
    write_best,
    written_whole,
)
from qwen_cls.step_axis import define_wandb_axis, wandb_row


def read_config(checkpoint: Path, config_path: str | None) -> RunConfig:
    """From ``config_path`` (the training YAML) or else the config stored in the checkpoint, through the
    section classes (:meth:`RunConfig.from_mapping`)."""
    if config_path:
        from qwen_cls.train import load_config_file

        return RunConfig.from_mapping(load_config_file(config_path, "--config_path"), str(config_path))
    if not (checkpoint / INFO_FILE).is_file():
        raise ConfigError(f"--checkpoint_path: {checkpoint} has no {INFO_FILE}; pass --config_path")
    return RunConfig.from_mapping(read_info(checkpoint).config, str(checkpoint / INFO_FILE))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest complete one when given a run's output_dir."""
    path = Path(path)
    if (path / HF_DIR).is_dir() or (path / STATE_DIR).exists():
        return path
    if path.is_dir():
        checkpoints = list_checkpoints(path)
        if checkpoints:
            say(f"evaluating the newest checkpoint of {path}: {checkpoints[-1].name}")
            return checkpoints[-1]
    raise ConfigError(
        f"--checkpoint_path: {path} is neither a checkpoint folder (with {HF_DIR}/) nor a run folder"
    )


def shards_only(checkpoint: Path) -> bool:
    return not (checkpoint / HF_DIR).is_dir() and (checkpoint / STATE_DIR / "latest").is_file()


def load_module(checkpoint: Path, run: RunConfig, partitioned: bool = False) -> QwenClassifier:
    """The trained module of a checkpoint: from ``hf_model/``, or else from the Lightning state in ``deepspeed/``.
    With ``partitioned`` (evaluation under ZeRO-3), a checkpoint of DeepSpeed shards alone gives the module of
    ``model.pretrained_name``, into whose partitions :class:`LoadZero3Weights` reads the shards."""
    hf_dir, state = checkpoint / HF_DIR, checkpoint / STATE_DIR / STATE_FILE
    kwargs = {"num_labels": run.model["num_labels"], "loss": run.loss, "datasets": run.datasets}
    kwargs["attn_implementation"] = run.model.get("attn_implementation", "auto")
    if hf_dir.is_dir():
        return QwenClassifier(pretrained_name=str(hf_dir), **kwargs)
    if shards_only(checkpoint):
        lora = (run.model.get("lora") or {}).get("enabled", False)
        if partitioned and not lora:
            return QwenClassifier(pretrained_name=run.model["pretrained_name"], **kwargs)
        how = "" if lora else ", or evaluate it with --strategy deepspeed_stage_3, which reads the shards"
        raise ConfigError(
            f"--checkpoint_path: {checkpoint} has no {HF_DIR}/, only DeepSpeed shards in {STATE_DIR}/; rebuild it "
            f"with: qwen-cls export --checkpoint_path {checkpoint}{how}"
        )
    if not state.is_file():
        raise ConfigError(
            f"--checkpoint_path: {checkpoint} has neither {HF_DIR}/ nor {STATE_DIR}/{STATE_FILE}"
        )
    module = QwenClassifier(pretrained_name=run.model["pretrained_name"], **kwargs)
    module.configure_model()
    module.load_state_dict(load_state(state)["state_dict"])
    return module


def load_state(path: Path) -> dict:
    """A Lightning checkpoint file, tensors and plain values only: a crafted pickle is refused, never run."""
    with refuse_unsafe_checkpoint(str(path)):
        return torch.load(path, map_location="cpu", weights_only=True)


def make_datamodule(run: RunConfig, eval_data: str | list[str], processor_path: Path, batch_size: int | None):
    """The run's own ``data:`` settings (batch size, pixel bounds, prompt, workers, image checks), on ``eval_data``."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch_size: must be >= 1, got {batch_size}")
    data = {**run.data, "train_jsonl": None, "val_jsonl": eval_data, "processor_path": str(processor_path)}
    if batch_size:
        data["eval_batch_size"] = batch_size
    datamodule = QwenDataModule(**data, datasets=run.datasets)
    datamodule.full_eval = True
    return datamodule


def _processor_path(checkpoint: Path, run: RunConfig) -> Path:
    return checkpoint / HF_DIR if (checkpoint / HF_DIR).is_dir() else Path(run.model["pretrained_name"])


def _trainer_precision(run: RunConfig) -> str | None:
    precision = run.trainer.get("precision")
    return None if precision is None else str(precision)


def check_class_names(checkpoint: Path, run: RunConfig) -> None:
    """A ``--config_path`` whose class names are not the ones the checkpoint's head was trained with would
    label every result wrongly: one line naming the first column that differs."""
    config_file = checkpoint / HF_DIR / "config.json"
    if not config_file.is_file():
        return
    saved = {int(k): v for k, v in (json.loads(config_file.read_text()).get("id2label") or {}).items()}
    ours = run.datasets.id2label(run.model["num_labels"])
    if all(v == str(k) or v == f"LABEL_{k}" for k, v in saved.items()):  # trained without class names
        return
    for column in sorted(ours):
        if column in saved and saved[column] != ours[column]:
            raise ConfigError(
                f"datasets.dataset_configs: class {column} is {ours[column]!r} here but {saved[column]!r} in "
                f"{config_file}; evaluate with the class names the checkpoint was trained with"
            )


def evaluate(
    checkpoint_path: str,
    eval_data: str,
    config_path: str | None = None,
    batch_size: int | None = None,
    output: str | None = None,
    where: EvalDevices | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint and print a table (``qwen-cls evaluate``; the parameters: :func:`qwen_cls.commands.evaluate`)."""
    where = where or EvalDevices()
    checkpoint = resolve_checkpoint(checkpoint_path)
    where.check_rows(eval_data)
    run = read_config(checkpoint, config_path)
    check_class_names(checkpoint, run)
    datamodule = make_datamodule(run, eval_data, _processor_path(checkpoint, run), batch_size)
    module = load_module(checkpoint, run, where.partitions)  # its errors before the trainer's banner
    processes = EvalProcesses(where, datamodule.eval_batch_size, _trainer_precision(run)).start()
    processes.validate(module, datamodule, checkpoint if shards_only(checkpoint) else None)
    classes = class_rows(module.last_eval_classes, run.datasets)
    result = {"checkpoint": str(checkpoint), "eval_data": str(eval_data), **module.last_eval_metrics}
    if processes.is_global_zero:
        _print_table(result, module.dataset_names, run.datasets)
        _say_weakest(classes)
        if output:
            _write_evaluation(
                Path(output), {**result, "classes": classes}, module.last_eval_classes, run.datasets
            )
    return {**result, "classes": classes}


def _write_evaluation(path: Path, result: dict[str, Any], classes: dict[str, ClassScores], datasets) -> None:
    """``--output X.json``: the metrics and per-class rows; beside it ``X.classes.csv`` and, per dataset,
    ``X.confusion.<dataset>.csv`` and ``.png``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    write_class_files(path.with_suffix(""), result["classes"], classes, datasets)


def write_class_files(
    stem: Path, rows: list[dict[str, Any]], classes: dict[str, ClassScores], datasets
) -> None:
    write_csv(stem.with_name(f"{stem.name}.classes.csv"), rows, CLASS_COLUMNS)
    for dataset, scores in classes.items():
        names = datasets.names(dataset) if dataset in datasets.dataset_configs else None
        write_confusion(stem, dataset, scores, names)


def _say_weakest(rows: list[dict[str, Any]], count: int = 5) -> None:
    worst = weakest(rows, count)
    if worst:
        listed = ", ".join(f"{r['dataset']}/{r['name']} {float(r['f1']):.3f}" for r in worst)
        say(f"weakest classes by F1: {listed}")


def evaluate_all(
    run_dir: str,
    *,
    eval_data: str,
    output_dir: str | None = None,
    config_path: str | None = None,
    batch_size: int | None = None,
    watch: bool = False,
    poll_seconds: float = 30.0,
    timeout: float | None = None,
    stale_after: float = 300.0,
    wait_for_run: bool = False,
    wandb: bool = True,
    metric: str | None = None,
    mode: str | None = None,
    where: EvalDevices | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every complete checkpoint of a run, rank them, plot them and name the best (``qwen-cls
    evaluate-all``; the parameters: :func:`qwen_cls.commands.evaluate_all`).

    Every rank lists the checkpoints, but rank 0's list and its decision to stop are the ones followed (the
    ranks must evaluate the same checkpoints); rank 0 alone writes, prints and logs."""
    where = where or EvalDevices()
    run, out = Path(run_dir), Path(output_dir or run_dir)
    where.check_rows(eval_data)
    if not watch and not (run.is_dir() and list_checkpoints(run)):
        raise ConfigError(f"run_dir: {run} holds no complete checkpoint")
    if watch and not wait_for_run and not _is_run(run):
        raise ConfigError(
            f"run_dir: {run} is not a run folder (no checkpoint, no running fit); check the path, or add "
            "--wait_for_run to wait for a run to start there"
        )
    rows: list[dict[str, Any]] = []
    class_table: list[dict[str, Any]] = []
    processes, datamodule, config, tracking, logger = None, None, None, None, None
    watcher = _Watch(run, stale_after, poll_seconds) if watch else None
    started, finished = time.monotonic(), False
    while True:
        listed = list_checkpoints(run) if run.is_dir() else []
        if processes is None and listed:
            config = read_config(listed[0], config_path)
            tracking = _tracking(config, metric, mode)
            datamodule = make_datamodule(config, eval_data, _processor_path(listed[0], config), batch_size)
            processes = EvalProcesses(where, datamodule.eval_batch_size, _trainer_precision(config)).start()
        if processes is not None:
            names = processes.broadcast([c.name for c in listed])
            listed = [run / name for name in names]
        done = {row["step"] for row in rows}
        for ckpt in listed:
            if checkpoint_step(ckpt) in done:
                continue
            info = read_info(ckpt)
            module = load_module(ckpt, config, where.partitions)
            processes.validate(module, datamodule, ckpt if shards_only(ckpt) else None)
            metrics, step = dict(module.last_eval_metrics), checkpoint_step(ckpt)
            rows.append({"step": step, "checkpoint": ckpt.name, **metrics})
            finished = finished or info.final
            if not processes.is_global_zero:
                continue
            say(f"{ckpt.name}: {tracking.metric} = {metrics.get(tracking.metric, float('nan')):.4f}")
            classes = class_rows(module.last_eval_classes, config.datasets)
            class_table += [{"step": step, "checkpoint": ckpt.name, **r} for r in classes]
            # written before any logger runs: a result is never lost to one
            _write_results(out, run, rows, config, tracking, eval_data, class_table)
            if best_row(rows, tracking.metric, tracking.mode)["step"] == step:
                _write_best_classes(
                    out / BEST_CLASSES_DIR, ckpt.name, classes, module.last_eval_classes, config
                )
            if wandb and info.wandb and logger is not False:
                logger = logger or _WandbHistory.start(info)
                if logger and not logger.log(step, metrics):
                    logger = False
            del module
        stop = watcher is None or finished or watcher.run_has_stopped(rows)
        if not stop and timeout is not None and time.monotonic() - started > timeout:
            say(f"stopped watching {run} after {timeout:.0f} s without its final checkpoint")
            stop = True
        if processes is not None:
            stop = processes.broadcast(stop)
        if stop:
            break
        time.sleep(poll_seconds)
    if logger:
        logger.finish()
    if rows and (processes is None or processes.is_global_zero):
        _print_ranking(rows, tracking)
        best = best_row(rows, tracking.metric, tracking.mode)
        names = list(config.datasets.dataset_configs)
        _print_table(
            {**best, "checkpoint": f"best: {best['checkpoint']}", "eval_data": eval_data},
            names,
            config.datasets,
        )
        _say_weakest([r for r in class_table if r["step"] == best["step"]])
    return rows


def _tracking(config: RunConfig, metric: str | None, mode: str | None) -> BestModelTrackingConfig:
    """What ranks the checkpoints: ``--metric``/``--mode``, else the run's best_model_tracking. A metric
    named without a mode is minimised when it is a loss, else maximised."""
    if metric is None:
        if mode is None:
            return config.best_model_tracking
        metric = config.best_model_tracking.metric
    valid = best_metric_names(config.datasets.dataset_configs)
    if metric not in valid:
        raise ConfigError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(valid)}")
    return BestModelTrackingConfig(metric=metric, mode=mode or ("min" if metric.endswith("_loss") else "max"))


def _write_best_classes(
    folder: Path, name: str, rows, classes: dict[str, ClassScores], config: RunConfig
) -> None:
    """The best checkpoint's per-class CSV and confusion matrices, replacing the previous best's whole."""
    with written_whole(folder, replace=True) as tmp:
        write_class_files(tmp / name, rows, classes, config.datasets)


def _is_run(path: Path) -> bool:
    """A folder a fit trains or trained into: a checkpoint (complete or being saved), a running fit's marker,
    or its logs."""
    if not path.is_dir():
        return False
    return live_owner(path) is not None or any(
        checkpoint_step(p) is not None or p.name.startswith(f".{CHECKPOINT_PREFIX}") or p.name == "logs"
        for p in path.iterdir()
    )


class _Watch:
    """When ``evaluate-all --watch`` stops waiting for a run's final checkpoint: the run stopped by a signal
    (its newest checkpoint says so and no fit holds the folder), or no fit has held the folder for
    ``stale_after`` seconds (killed, crashed, never started). Every few minutes it says what it waits for."""

    SAY_EVERY = 300.0

    def __init__(self, run: Path, stale_after: float, poll_seconds: float):
        self.run, self.stale_after = run, stale_after
        self.said = self.seen_alive = time.monotonic()
        self.say_every = max(self.SAY_EVERY, poll_seconds)

    def run_has_stopped(self, rows: list[dict[str, Any]]) -> bool:
        now = time.monotonic()
        owner = live_owner(self.run) if self.run.is_dir() else None
        complete = scan_checkpoints(self.run)[0] if self.run.is_dir() else []  # the loop warned of the others
        newest = complete[-1] if complete else None
        stopped_by = read_info(newest).stopped_by if newest is not None else None
        if owner is not None:
            self.seen_alive = now
        elif stopped_by:
            say(
                f"stopped watching {self.run}: the run was stopped by {stopped_by} at {newest.name} and no fit holds "
                "it now; resume it (--ckpt_path last) and watch again"
            )
            return True
        elif now - self.seen_alive >= self.stale_after:
            where = f"its newest checkpoint is {newest.name}, not final" if newest else "it has no checkpoint"
            say(
                f"stopped watching {self.run}: no fit has trained into it for {self.stale_after:.0f} s and {where} "
                "(killed or crashed?); resume it and watch again"
            )
            return True
        if now - self.said >= self.say_every:
            self.said = now
            holder = f"fit {describe_owner(owner)}" if owner else "no fit running there now"
            newest_name = newest.name if newest else "none yet"
            say(
                f"watching {self.run}: {len(rows)} checkpoints evaluated, newest {newest_name}; waiting for the "
                f"next ({holder})"
            )
        return False


def _write_results(
    out: Path,
    run: Path,
    rows: list[dict[str, Any]],
    config: RunConfig,
    tracking: BestModelTrackingConfig,
    eval_data: str,
    class_table: list[dict[str, Any]],
) -> None:
    """eval_all.csv, eval_all_classes.csv, best_checkpoint.json and eval_all.png, each written whole (a kill
    leaves the previous version or the new one)."""
    rows.sort(key=lambda r: r["step"])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / CSV_FILE, rows, tuple(dict.fromkeys(key for row in rows for key in row)))
    write_csv(out / CLASSES_FILE, class_table, ("step", "checkpoint", *CLASS_COLUMNS))
    best = best_row(rows, tracking.metric, tracking.mode)
    record = BestRecord(
        checkpoint=best["checkpoint"],
        step=best["step"],
        metric=tracking.metric,
        mode=tracking.mode,
        value=best[tracking.metric],
        source="evaluate-all",
        eval_data=str(eval_data),
    )
    write_best(out, record)
    datasets = list(config.datasets.dataset_configs)
    _plot(out / PLOT_FILE, run.name, rows, datasets, {**best, "metric_name": tracking.metric})


def _plot(
    path: Path, title: str, rows: list[dict[str, Any]], datasets: list[str], best: dict[str, Any]
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    groups = ["overall"] + (datasets if len(datasets) > 1 else [])
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)  # no pyplot: a notebook's backend stays its own
    FigureCanvasAgg(fig)
    acc_ax, loss_ax = fig.subplots(1, 2)
    for group in groups:
        style = {"linewidth": 2.2} if group == "overall" else {"linewidth": 1.2, "alpha": 0.8}
        acc_ax.plot(
            steps, [r.get(f"{group}_accuracy") for r in rows], marker="o", label=f"{group} top-1", **style
        )
        loss_ax.plot(steps, [r.get(f"{group}_loss") for r in rows], marker="o", label=group, **style)
    acc_ax.plot(steps, [r.get("overall_top5_accuracy") for r in rows], linestyle="--", label="overall top-5")
    metric = best["metric_name"]
    star_ax = loss_ax if metric.endswith("_loss") else acc_ax
    star_ax.scatter(
        [best["step"]],
        [best[metric]],
        s=220,
        marker="*",
        color="gold",
        zorder=5,
        edgecolor="black",
        label=f"best by {metric}: {best['checkpoint']}",
    )
    acc_ax.set(xlabel="optimizer step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    loss_ax.set(xlabel="optimizer step", ylabel="mean loss per sample", title="loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: evaluation of every checkpoint")
    fig.savefig(path, dpi=110)


class _WandbHistory:
    """Writes evaluation results into the training run's W&B history, against the training step. W&B failing
    (no network, a server error) is one warning and the end of W&B logging here, never of the evaluation."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, info: CheckpointInfo) -> _WandbHistory | bool:
        """The training run's W&B run resumed (offline when W&B cannot be reached), or False."""
        try:
            import wandb
        except ImportError:
            say("W&B: not installed here (pip install 'qwen-cls[wandb]'); the results are in the CSV only")
            return False

        run = info.wandb
        timeout = float(info.section("wandb").get("start_timeout") or WandbConfig.start_timeout)
        try:
            handle = wandb.init(
                id=run["id"],
                project=run.get("project"),
                entity=run.get("entity"),
                dir=run.get("dir"),
                resume="allow",
                mode=wandb_mode(timeout),
                settings=wandb.Settings(init_timeout=timeout),
            )
            define_wandb_axis(handle)
        except Exception as e:  # wandb's errors are many and its own; the results are written regardless
            say(
                f"W&B: not logging the results to run {run['id']} ({type(e).__name__}: {str(e).splitlines()[0]})"
            )
            return False
        return cls(handle)

    def log(self, step: int, metrics: dict[str, float]) -> bool:
        try:
            self.run.log(wandb_row(step, metrics, "eval"))
        except Exception as e:  # as in start
            say(
                f"W&B: logging stopped ({type(e).__name__}: {str(e).splitlines()[0]}); the results are in the CSV"
            )
            return False
        return True

    def finish(self) -> None:
        self.run.finish()


def _print_table(metrics: dict[str, Any], dataset_names: list[str], datasets: DatasetsConfig) -> None:
    table = Table(title=f"{metrics['checkpoint']} on {metrics['eval_data']}")
    for column in ("dataset", "top-1", "top-5", "macro-F1", "balanced acc.", "loss", "samples"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    shown = [name for name in ["overall", *dataset_names] if f"{name}_samples" in metrics]
    for name in shown:
        table.add_row(
            name,
            f"{metrics[f'{name}_accuracy']:.4f}",
            f"{metrics[f'{name}_top5_accuracy']:.4f}",
            f"{metrics.get(f'{name}_macro_f1', float('nan')):.4f}",
            f"{metrics.get(f'{name}_balanced_accuracy', float('nan')):.4f}",
            f"{metrics[f'{name}_loss']:.4f}",
            str(metrics[f"{name}_samples"]),
        )
    Console().print(table)
    for name in shown[1:]:  # a line each: a table column of names would wrap to nothing on a terminal
        names = datasets.names(name) if name in datasets.dataset_configs else []
        if names:
            say(
                f"classes of {name}: "
                + ", ".join(names[:12])
                + (f", ... ({len(names)})" if len(names) > 12 else "")
            )


def _print_ranking(rows: list[dict[str, Any]], tracking: BestModelTrackingConfig) -> None:
    metric = tracking.metric
    ranked = sorted((r for r in rows if metric in r), key=lambda r: r[metric], reverse=tracking.mode == "max")
    table = Table(title=f"checkpoints ranked by {metric} ({tracking.mode})")
    shown = [
        k
        for k in ("overall_accuracy", "overall_macro_f1", "overall_top5_accuracy", "overall_loss")
        if k != metric
    ]
    for column in ("rank", "checkpoint", metric, *shown):
        table.add_column(
            column.removeprefix("overall_"), justify="left" if column == "checkpoint" else "right"
        )
    for rank, row in enumerate(ranked, start=1):
        table.add_row(
            str(rank), row["checkpoint"], *(f"{row.get(k, float('nan')):.4f}" for k in (metric, *shown))
        )
    Console().print(table)
    say(f"best checkpoint: {ranked[0]['checkpoint']} ({metric} = {ranked[0][metric]:.4f})")

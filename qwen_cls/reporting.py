"""``qwen-cls report RUN_DIR``: one Markdown page per run — what happened, its curves, its checkpoints and
which one to use. Works on finished, running and killed runs; reads only what the run wrote."""

from __future__ import annotations

import csv
import datetime
import os
import statistics
from pathlib import Path
from typing import Any

import yaml

from qwen_cls.class_report import weakest
from qwen_cls.console import say
from qwen_cls.errors import ConfigError
from qwen_cls.plots import PLOTS_DIR, plot_run, read_metrics
from qwen_cls.run_dir import (
    BEST_CLASSES_DIR,
    BEST_FILE,
    CLASSES_FILE,
    CSV_FILE,
    PLOT_FILE,
    CheckpointInfo,
    best_row,
    read_best,
    read_info,
    run_status,
    scan_checkpoints,
)

EVAL_COLUMNS = (
    ("overall_accuracy", "accuracy"),
    ("overall_top5_accuracy", "top-5"),
    ("overall_macro_f1", "macro-F1"),
    ("overall_loss", "eval loss"),
)


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "KiB", "MiB", "GiB"):
        if total < 1024 or unit == "GiB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _or_unknown(value: Any) -> Any:
    return "?" if value is None else value


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else ("" if value is None else str(value))


def _eval_results(run: Path, infos: dict[int, CheckpointInfo]) -> tuple[dict[int, dict[str, float]], str]:
    """Evaluation metrics per step: evaluate-all's CSV where present, else what training evaluated."""
    if (run / CSV_FILE).is_file():
        with (run / CSV_FILE).open() as fh:
            rows = list(csv.DictReader(fh))
        parsed = {
            int(r["step"]): {k: float(v) for k, v in r.items() if k not in ("step", "checkpoint") and v}
            for r in rows
        }
        return parsed, f"`qwen-cls evaluate-all` ({CSV_FILE})"
    during = {step: info.eval_metrics for step, info in infos.items() if info.eval_metrics}
    return during, "evaluation during training"


def _best(run: Path, results: dict[int, dict[str, float]], source: str) -> tuple[int | None, str]:
    """The checkpoint to use and why, from the evaluations the run has."""
    record = read_best(run)
    metric, mode = (record.metric, record.mode) if record else ("overall_accuracy", "max")
    if results and any(metric in r for r in results.values()):
        best = best_row([{"step": s, **r} for s, r in results.items()], metric, mode)
        word = "highest" if mode == "max" else "lowest"
        scored = sum(metric in r for r in results.values())
        return best[
            "step"
        ], f"{word} {metric} ({best[metric]:.4f}) of {scored} evaluated checkpoints, from {source}"
    if record:
        return record.step, f"{record.metric} = {record.value:.4f} ({record.mode}), from {BEST_FILE}"
    return None, ""


def _weakest_classes(run: Path, best_step: int | None, link) -> list[str]:
    """The best checkpoint's classes with the lowest F1, from evaluate-all's per-class CSV, and its confusion
    matrices (evaluate-all keeps the best one's)."""
    if best_step is None or not (run / CLASSES_FILE).is_file():
        return []
    with (run / CLASSES_FILE).open() as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) == best_step]
    worst = weakest(rows, 10)
    if not worst:
        return []
    lines = [f"## Weakest classes of checkpoint-{best_step}", ""]
    header = ["dataset", "class", "F1", "precision", "recall", "samples", "predicted"]
    table = [
        [
            r["dataset"],
            r["name"],
            *(f"{float(r[k]):.3f}" for k in ("f1", "precision", "recall")),
            r["support"],
            r["predicted"],
        ]
        for r in worst
    ]
    lines += [_table(header, table), "", f"All classes of every checkpoint: `{CLASSES_FILE}`.", ""]
    for png in sorted((run / BEST_CLASSES_DIR).glob(f"checkpoint-{best_step}.confusion.*.png")):
        lines.append(f"![{png.stem}]({link(png)})")
    return lines + [""]


def _medians(rows: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Median over logging windows, leaving out the first (start-up) when there are others."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = statistics.median(values[1:] or values)
    return out


def write_report(run_dir: str, output: str | None = None) -> Path:
    """A Markdown report of a run (``qwen-cls report``; the parameters: :func:`qwen_cls.commands.report`)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run_dir: {run} is not a folder")
    checkpoints, incomplete = scan_checkpoints(run)
    metrics = read_metrics(run)
    if not checkpoints and not metrics:
        raise ConfigError(
            f"run_dir: {run} holds neither a checkpoint nor a metrics log; is it a qwen-cls run?"
        )
    out = Path(output) if output else run / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    infos = {info.step: info for info in map(read_info, checkpoints)}
    last = infos[max(infos)] if infos else CheckpointInfo(step=0)  # a run with a log and no checkpoint yet
    status = run_status(run, checkpoints)
    plot_run(run, last.section("wandb").get("run_name"))
    link = lambda p: Path(os.path.relpath(p, out.parent)).as_posix()  # noqa: E731

    results, source = _eval_results(run, infos)
    best_step, why = _best(run, results, source)
    lines = [f"# Run report: {run.resolve().name}", ""]
    planned = last.total_steps
    reached = max(infos) if infos else int(metrics[-1]["step"])
    state = {
        "finished": f"**Finished**: {reached} of {planned} optimizer steps.",
        "in progress": f"**In progress**: {reached} of {planned or '?'} steps so far (the last checkpoint's).",
        "stopped": (
            f"**Stopped before the end** (killed or crashed) at step {reached} of {planned or '?'}; resume with "
            "`qwen-cls fit --config <its config> --ckpt_path last`."
        ),
    }.get(status, f"**{status}**: {reached} steps so far.")
    if status.startswith("stopped by"):
        state = (
            f"**Stopped by signal** ({status.removeprefix('stopped by ')}) at step {reached} of {planned or '?'}, "
            "its checkpoint complete; resume with `qwen-cls fit --config <its config> --ckpt_path last`."
        )
    lines += [state, ""]

    perf = _medians(
        metrics,
        (
            "perf/samples_per_second",
            "perf/tokens_per_second",
            "perf/tflops",
            "perf/mfu",
            "perf/data_wait_fraction",
        ),
    )
    summary = [
        ["wall time (training)", _duration(last.elapsed_seconds)],
        ["samples seen", _or_unknown(last.samples_seen)],
        [
            "throughput (median)",
            f"{perf['perf/samples_per_second']:.1f} samples/s, {perf['perf/tokens_per_second']:.0f} tokens/s"
            if "perf/samples_per_second" in perf
            else "not logged",
        ],
        [
            "model TFLOP/s per device (median)",
            f"{perf['perf/tflops']:.3g}" if "perf/tflops" in perf else "not logged",
        ],
        [
            "MFU (median)",
            f"{100 * perf['perf/mfu']:.1f}%"
            if "perf/mfu" in perf
            else "not logged (no peak known for the device; set monitor.peak_tflops)",
        ],
        [
            "waiting for data (median)",
            f"{100 * perf['perf/data_wait_fraction']:.1f}% of step time"
            if "perf/data_wait_fraction" in perf
            else "not logged",
        ],
        [
            "best checkpoint",
            f"checkpoint-{best_step}: {why}"
            if best_step is not None
            else "none named: no evaluation yet (`qwen-cls evaluate-all RUN_DIR --eval_data VAL.jsonl`)",
        ],
    ]
    for name, dataset in (last.section("datasets").get("dataset_configs") or {}).items():
        names = dataset.get("class_names")
        shown = (
            ", ".join(names[:12]) + (f", ... ({len(names)})" if len(names) > 12 else "") if names else None
        )
        summary.append(
            [f"classes of {name}", shown or f"{dataset.get('num_classes')} (numbered; no class_names)"]
        )
    lines += ["## Summary", "", _table(["", ""], summary), ""]

    lines += ["## Checkpoints", ""]
    header = ["checkpoint", "step", "wall time", "size", "train loss"] + [name for _, name in EVAL_COLUMNS]
    table = []
    for step, info in sorted(infos.items()):
        evaluated = results.get(step, {})
        name = f"checkpoint-{step}" + (" **(best)**" if step == best_step else "")
        table.append(
            [
                name,
                step,
                _duration(info.elapsed_seconds),
                _size(run / f"checkpoint-{step}"),
                _fmt(info.train_loss),
            ]
            + [_fmt(evaluated.get(key)) for key, _ in EVAL_COLUMNS]
        )
    lines += [_table(header, table) if table else "No complete checkpoint yet.", ""]
    if results:
        lines += [f"Evaluation metrics from {source}.", ""]
    for path, reason in incomplete:
        lines.append(f"- skipped `{path.name}`: {reason}")
    lines += [""] if incomplete else []

    lines += _weakest_classes(run, best_step, link)

    lines += ["## Curves", ""]
    for png, title in (
        ("loss.png", "training loss"),
        ("lr.png", "learning rate"),
        ("grad_norm.png", "gradient norm"),
        ("throughput.png", "throughput"),
    ):
        lines.append(f"![{title}]({link(run / PLOTS_DIR / png)})")
    if (run / PLOT_FILE).is_file():
        lines.append(f"![evaluation of every checkpoint]({link(run / PLOT_FILE)})")
    lines.append("")

    if last:
        lines += ["## Configuration", ""]
        overrides = last.overrides
        lines += (
            ["Keys that `training.skip_evaluation` (the resolver) overrode:", ""]
            if overrides
            else ["The resolver overrode no key.", ""]
        )
        lines += [f"- {o}" for o in overrides] + ([""] if overrides else [])
        lines += [
            "<details><summary>resolved config</summary>",
            "",
            "```yaml",
            yaml.safe_dump(last.config, sort_keys=False).rstrip(),
            "```",
            "</details>",
            "",
        ]
        lines += ["## Environment", ""]
        env = [
            ["device", _or_unknown(last.device)],
            ["world size", _or_unknown(last.world_size)],
            ["strategy", _or_unknown(last.strategy)],
            ["precision", _or_unknown(last.precision)],
        ] + [[name, version] for name, version in last.versions.items()]
        lines += [_table(["", ""], env), ""]
    out.write_text("\n".join(lines))
    say(
        f"report: {out} ({status}; {len(checkpoints)} checkpoints{f', {len(incomplete)} incomplete skipped' if incomplete else ''})"
    )
    return out

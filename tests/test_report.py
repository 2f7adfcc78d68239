"""Pictures of a run: plots beside the checkpoints and `qwen-cls report` on finished, broken and evaluated runs."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from qwen_cls.evaluation import evaluate_all
from qwen_cls.reporting import write_report
from qwen_cls.train import run_lightning_cli
from tests.helpers import base_config, run_log, write_config

pytestmark = pytest.mark.slow

PLOTS = ("loss.png", "lr.png", "grad_norm.png", "throughput.png")


@pytest.fixture(scope="module")
def finished_run(tiny_model, demo_data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    config = base_config(tiny_model, demo_data, tmp / "run")
    config["wandb"] = {"run_name": "tiny-report", "log_dataset_metrics": True}
    config["training"].update(max_steps=12, save_steps=4, logging_steps=2)
    run_lightning_cli(["fit", "--config", str(write_config(tmp / "c.yaml", config))])
    return tmp / "run"


def _logged(run: Path, key: str) -> int:
    with run_log(run).open() as fh:
        return sum(1 for row in csv.DictReader(fh) if row.get(key))


def test_fit_draws_plots_from_the_logged_points(finished_run):
    for name in PLOTS:
        path = finished_run / "plots" / name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 600
            points = json.loads(image.text["Description"])["points"]
        for key, count in points.items():
            assert count == _logged(finished_run, key) > 0, (name, key)
    with Image.open(finished_run / "plots" / "loss.png") as image:
        points = json.loads(image.text["Description"])["points"]
    assert set(points) == {"train/loss"}  # one dataset: its own line would repeat the overall one
    assert points["train/loss"] == 6  # 12 steps, logged every 2


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}")[1].split("\n## ")[0]


def test_report_on_a_finished_run(finished_run, tmp_path):
    out = write_report(str(finished_run), str(tmp_path / "pages" / "report.md"))
    text = out.read_text()
    assert "**Finished**: 12 of 12 optimizer steps." in text
    rows = re.findall(r"^\| (checkpoint-\d+)", _section(text, "Checkpoints"), re.M)
    assert rows == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert "none named: no evaluation yet" in text
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out.parent / link).is_file(), link  # images resolve relative to the page
    assert "skip_evaluation" in _section(text, "Configuration")
    assert "world size | 1" in text and "| torch |" in text
    assert "samples/s" in text and "MFU (median) | not logged" in text  # CPU: no peak known


def test_report_skips_an_incomplete_last_checkpoint(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoint-12" / "hf_model")  # as if killed while saving
    text = write_report(str(run)).read_text()
    assert "**Stopped before the end** (killed or crashed) at step 8 of 12" in text
    assert "skipped `checkpoint-12`: incomplete checkpoint folder (no hf_model)" in text
    assert re.findall(r"^\| (checkpoint-\d+)", _section(text, "Checkpoints"), re.M) == [
        "checkpoint-4",
        "checkpoint-8",
    ]


def test_report_names_the_argmax_of_eval_all_as_best(finished_run, demo_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    val = tmp_path / "val.jsonl"
    rows = [json.loads(line) for line in (demo_data / "val.jsonl").read_text().splitlines()[::5]]
    val.write_text(
        "".join(json.dumps({**r, "image_path": str(demo_data / r["image_path"])}) + "\n" for r in rows)
    )
    evaluate_all(str(run), eval_data=str(val), wandb=False)
    with (run / "eval_all.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    argmax = max(rows, key=lambda r: float(r["overall_accuracy"]))["checkpoint"]
    text = write_report(str(run)).read_text()
    assert f"| best checkpoint | {argmax}: highest overall_accuracy" in text
    assert f"| {argmax} **(best)** |" in text
    for row in rows:  # every evaluated checkpoint shows its accuracy
        assert re.search(
            rf"^\| {row['checkpoint']}( \*\*\(best\)\*\*)? \|.*\| {float(row['overall_accuracy']):.4g} \|",
            text,
            re.M,
        )
    assert "![evaluation of every checkpoint](eval_all.png)" in text
    # the best checkpoint's weakest classes, from evaluate-all's per-class CSV, and its confusion matrix
    step = argmax.removeprefix("checkpoint-")
    with (run / "eval_all_classes.csv").open() as fh:
        classes = [r for r in csv.DictReader(fh) if r["step"] == step]
    assert len(classes) == 10 and sum(int(r["support"]) for r in classes) == 200
    worst = min(classes, key=lambda r: (float(r["f1"]), float(r["recall"])))
    section = _section(text, f"Weakest classes of {argmax}")
    assert section.splitlines()[4].startswith(f"| mnist | {worst['name']} | {float(worst['f1']):.3f} |")
    assert f"![{argmax}.confusion.mnist](eval_all_best/{argmax}.confusion.mnist.png)" in section
    assert (run / "eval_all_best" / f"{argmax}.confusion.mnist.csv").is_file()

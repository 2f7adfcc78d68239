"""Standard mode with best-model tracking, and evaluating any or every checkpoint afterwards."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from qwen_cls.cli import main
from qwen_cls.config import DatasetConfig
from qwen_cls.data import eval_subset
from qwen_cls.evaluation import evaluate, evaluate_all
from qwen_cls.rows import read_rows
from qwen_cls.train import run_lightning_cli
from tests.helpers import REPO, base_config, child_env, run_log, run_main, start_qwen_cls, write_config

pytestmark = pytest.mark.slow


def partial_evals(run: Path, samples: int = 100) -> dict[int, dict[str, float]]:
    """The logged evaluations on the ``samples``-row subset, by optimizer step."""
    with run_log(run).open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("eval/overall_samples")]
    evals = [
        (int(r["step"]), {k[5:]: float(v) for k, v in r.items() if k.startswith("eval/") and v}) for r in rows
    ]
    return {step: m for step, m in evals if m["overall_samples"] == samples}


def standard_config(tiny_model, demo_data, run: Path, **training) -> dict:
    config = base_config(tiny_model, demo_data, run)
    config["datasets"]["dataset_configs"]["mnist"]["eval_ratio"] = 0.1
    config["training"].update(
        {"skip_evaluation": False, "max_steps": 9, "eval_steps": 3, "save_steps": 3, **training}
    )
    config["trainer"]["num_sanity_val_steps"] = 0
    return config


def test_partial_evaluation_runs_at_eval_steps_on_the_fixed_subset(tiny_model, demo_data, tmp_path):
    run = tmp_path / "run"
    config = standard_config(tiny_model, demo_data, run, save_all_checkpoints=True)
    config["evaluation"] = {"partial_eval_during_training": True, "full_eval_at_end": True}
    config["best_model_tracking"] = {"enabled": True, "metric": "overall_macro_f1", "mode": "max"}
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])

    partial = partial_evals(run)
    assert sorted(partial) == [3, 6, 9]  # exactly every eval_steps, on the 10% subset
    assert json.loads((run / "eval_final.json").read_text())["overall_samples"] == 1000  # all rows at the end
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]

    # the subset is the seeded one: evaluating checkpoint-3 on exactly those rows reproduces step 3's numbers
    configs = {"mnist": DatasetConfig(10, eval_ratio=0.1)}
    subset = eval_subset(read_rows(demo_data / "val.jsonl", configs), configs)
    subset_file = tmp_path / "subset.jsonl"
    subset_file.write_text(
        "".join(json.dumps({"image_path": str(r.image_path), "label": r.label}) + "\n" for r in subset)
    )
    post_hoc = evaluate(str(run / "checkpoint-3"), str(subset_file))
    assert post_hoc["overall_samples"] == 100
    assert post_hoc["overall_loss"] == pytest.approx(partial[3]["overall_loss"], abs=1e-4)
    assert post_hoc["overall_accuracy"] == pytest.approx(partial[3]["overall_accuracy"], abs=1e-6)
    assert post_hoc["overall_macro_f1"] == pytest.approx(partial[3]["overall_macro_f1"], abs=1e-6)
    # the checkpoints were ranked by macro-F1 as they were saved
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert best["metric"] == "overall_macro_f1"
    assert best["value"] == pytest.approx(max(p["overall_macro_f1"] for p in partial.values()), abs=1e-9)
    # and each checkpoint records the evaluation of its own step
    info = json.loads((run / "checkpoint-6" / "training_info.json").read_text())
    assert info["eval_metrics"]["overall_loss"] == pytest.approx(partial[6]["overall_loss"], abs=1e-6)


def test_save_best_only_keeps_best_and_latest_and_final_eval_uses_the_best(tiny_model, demo_data, tmp_path):
    """Ranking by the *highest* loss makes an early checkpoint the best, so best != last."""
    run = tmp_path / "run"
    config = standard_config(tiny_model, demo_data, run, save_all_checkpoints=False, lr=1e-2)
    config["data"]["batch_size"] = 32  # the validation loss falls clearly over these 9 steps (2.35 -> 2.29)
    config["evaluation"] = {
        "partial_eval_during_training": True,
        "full_eval_at_end": True,
        "eval_best_model_only": True,
    }
    config["best_model_tracking"] = {
        "enabled": True,
        "metric": "overall_loss",
        "mode": "max",
        "save_best_only": True,
    }
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])

    partial = partial_evals(run)
    best_step = max(partial, key=lambda s: partial[s]["overall_loss"])
    assert best_step != 9, "precondition: the best checkpoint is not the last one"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == sorted(
        [f"checkpoint-{best_step}", "checkpoint-9"]
    )
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert best["checkpoint"] == f"checkpoint-{best_step}" and best["metric"] == "overall_loss"
    assert best["value"] == pytest.approx(partial[best_step]["overall_loss"], abs=1e-6)

    final = json.loads((run / "eval_final.json").read_text())
    assert final["weights"] == f"checkpoint-{best_step}"
    of_best = evaluate(str(run / f"checkpoint-{best_step}"), str(demo_data / "val.jsonl"))
    of_last = evaluate(str(run / "checkpoint-9"), str(demo_data / "val.jsonl"))
    assert final["overall_loss"] == pytest.approx(of_best["overall_loss"], abs=1e-4)
    assert abs(final["overall_loss"] - of_last["overall_loss"]) > 1e-3


@pytest.fixture(scope="module")
def no_eval_run(tiny_model, demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_all")
    config = base_config(tiny_model, demo_data, tmp / "run")
    config["data"]["batch_size"] = 16
    config["training"].update(max_steps=30, save_steps=10)
    config["wandb"] = {"enabled": True, "project": "qwen-cls-tests"}
    run_lightning_cli(["fit", "--config", str(write_config(tmp / "c.yaml", config))])
    return tmp / "run"


def test_evaluate_all_writes_csv_plot_and_names_the_argmax(no_eval_run, demo_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(no_eval_run, run)
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-99")
    (run / "checkpoint-99" / "training_info.json").unlink()  # incomplete: never counted
    shutil.copytree(run / "checkpoint-10", run / ".checkpoint-40.tmp")  # a save that did not finish
    out = tmp_path / "eval"
    with pytest.warns(UserWarning) as warned:
        main(
            [
                "evaluate-all",
                str(run),
                "--eval_data",
                str(demo_data / "val.jsonl"),
                "--output_dir",
                str(out),
                "--wandb",
                "false",
            ]
        )
    messages = " ".join(str(w.message) for w in warned)
    assert "checkpoint-99" in messages and ".checkpoint-40.tmp" in messages

    with (out / "eval_all.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert {"overall_accuracy", "overall_top5_accuracy", "overall_loss", "mnist_accuracy"} <= set(rows[0])
    best = json.loads((out / "best_checkpoint.json").read_text())
    argmax = max(rows, key=lambda r: float(r["overall_accuracy"]))
    assert best["checkpoint"] == argmax["checkpoint"] and best["value"] == pytest.approx(
        float(argmax["overall_accuracy"])
    )
    with Image.open(out / "eval_all.png") as image:
        image.verify()
    with Image.open(out / "eval_all.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
    # the same numbers as evaluating that checkpoint alone
    alone = evaluate(str(run / "checkpoint-20"), str(demo_data / "val.jsonl"))
    assert float(rows[1]["overall_loss"]) == pytest.approx(alone["overall_loss"], abs=1e-6)


def test_evaluate_all_watch_stops_at_the_final_checkpoint_and_logs_to_the_runs_wandb(no_eval_run, demo_data):
    rows = evaluate_all(
        str(no_eval_run), eval_data=str(demo_data / "val.jsonl"), watch=True, poll_seconds=0.1
    )
    assert [r["step"] for r in rows] == [10, 20, 30]  # returned without a timeout: checkpoint-30 is final
    info = json.loads((no_eval_run / "checkpoint-30" / "training_info.json").read_text())
    assert info["final"] is True
    run_id = info["wandb"]["id"]
    # the training run and the evaluation share one W&B run id (offline here: two local segments of it)
    assert len(list((no_eval_run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_multi_dataset_evaluation_reports_each_dataset(no_eval_run, demo_data, tmp_path):
    lines = (demo_data / "val.jsonl").read_text().splitlines()[:60]
    rows = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        path = str(demo_data / row["image_path"])
        if i % 2:
            rows.append({"image_path": path, "label": row["label"] % 3, "dataset_name": "mod3"})
        else:
            rows.append({"image_path": path, "label": row["label"], "dataset_name": "mnist"})
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load(run_log(no_eval_run, "config.yaml").read_text())
    config["datasets"]["dataset_configs"]["mod3"] = {"num_classes": 3, "description": "digit mod 3"}
    metrics = evaluate(
        str(no_eval_run / "checkpoint-30"),
        str(data),
        config_path=str(write_config(tmp_path / "c.yaml", config)),
    )
    assert (
        metrics["mnist_samples"] == 30 and metrics["mod3_samples"] == 30 and metrics["overall_samples"] == 60
    )
    assert metrics["overall_accuracy"] == pytest.approx(
        (metrics["mnist_accuracy"] + metrics["mod3_accuracy"]) / 2
    )


def test_data_parallel_validation_counts_every_row_once(no_eval_run, demo_data, tmp_path):
    """101 rows over 2 processes: a padding sampler would report 102."""
    data = tmp_path / "odd.jsonl"
    rows = [json.loads(x) for x in (demo_data / "val.jsonl").read_text().splitlines()[:101]]
    data.write_text(
        "".join(json.dumps({**r, "image_path": str(demo_data / r["image_path"])}) + "\n" for r in rows)
    )
    config = yaml.safe_load(run_log(no_eval_run, "config.yaml").read_text())
    config["data"]["val_jsonl"] = str(data)
    config["wandb"]["enabled"] = False
    for key in ("ckpt_path", "weights_only"):
        config.pop(key, None)
    path = write_config(tmp_path / "c.yaml", config)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_cls",
            "validate",
            "--config",
            str(path),
            "--ckpt_path",
            str(no_eval_run / "checkpoint-30"),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    single = evaluate(str(no_eval_run / "checkpoint-30"), str(data))
    cells = [line.split("│")[1:3] for line in out.stdout.splitlines() if "│" in line and "eval/" in line]
    reported = {name.strip(): float(value) for name, value in cells}
    assert reported["eval/overall_samples"] == 101
    assert reported["eval/overall_accuracy"] == pytest.approx(single["overall_accuracy"], abs=1e-4)


def test_a_checkpoint_without_hf_model_is_evaluated_from_its_training_state(no_eval_run, demo_data, tmp_path):
    ckpt = tmp_path / "checkpoint-20"
    shutil.copytree(no_eval_run / "checkpoint-20", ckpt)
    shutil.rmtree(ckpt / "hf_model")
    from_state = evaluate(str(ckpt), str(demo_data / "val.jsonl"))
    from_hf = evaluate(str(no_eval_run / "checkpoint-20"), str(demo_data / "val.jsonl"))
    for key in ("overall_accuracy", "overall_loss", "overall_samples"):
        assert from_state[key] == pytest.approx(from_hf[key], abs=1e-6)


def test_watch_follows_a_run_while_it_trains(tiny_model, demo_data, tmp_path):
    """`evaluate-all --watch` started before the first checkpoint exists evaluates each one as it lands."""
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"]["batch_size"] = 16
    config["training"].update(max_steps=30, save_steps=10)
    path = write_config(tmp_path / "c.yaml", config)
    training = start_qwen_cls("fit", "--config", str(path))
    try:
        rows = evaluate_all(
            str(tmp_path / "run"),
            eval_data=str(demo_data / "val.jsonl"),
            watch=True,
            wait_for_run=True,  # the folder does not exist yet
            poll_seconds=0.5,
            timeout=600,
            wandb=False,
        )
    finally:
        assert training.wait(timeout=600) == 0
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert (tmp_path / "run" / "eval_all.csv").read_text().count("\n") == 4


def _odd_rows(demo_data: Path, path: Path) -> Path:
    """91 validation rows (every 11th, all ten digits): 2 processes get 46 and 45 + a filler."""
    rows = [json.loads(x) for x in (demo_data / "val.jsonl").read_text().splitlines()[::11]]
    path.write_text(
        "".join(json.dumps({**r, "image_path": str(demo_data / r["image_path"])}) + "\n" for r in rows)
    )
    return path


def _child(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a process of its own (several ranks), output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.multiprocess
def test_one_process_ddp_and_zero3_give_the_same_numbers(no_eval_run, demo_data, tmp_path):
    """evaluate-all on 91 rows: 1 process = DDP x2 = ZeRO-3 x2 (the weights partitioned), every checkpoint,
    counts exactly, losses to float tolerance; and `evaluate` under ZeRO-3, started by torchrun, gives the same
    row."""
    data = _odd_rows(demo_data, tmp_path / "odd.jsonl")
    runs = {"one": [], "ddp": ["--devices", "2", "--strategy", "ddp"]}
    runs["zero3"] = ["--devices", "2", "--strategy", "deepspeed_stage_3"]
    said = {}
    for name, extra in runs.items():
        out = _child(
            "-m",
            "qwen_cls",
            "evaluate-all",
            str(no_eval_run),
            "--eval_data",
            str(data),
            "--output_dir",
            str(tmp_path / name),
            "--wandb",
            "false",
            "--accelerator",
            "cpu",
            *extra,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        said[name] = out.stdout
    one = _csv(tmp_path / "one" / "eval_all.csv")
    assert [r["step"] for r in one] == ["10", "20", "30"] and {r["overall_samples"] for r in one} == {"91"}
    for name in ("ddp", "zero3"):
        rows = _csv(tmp_path / name / "eval_all.csv")
        assert [r["step"] for r in rows] == ["10", "20", "30"]
        for a, b in zip(one, rows, strict=True):
            for key in a:
                if key.endswith("_loss"):
                    assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-6), (name, key)
                else:  # counts and ratios of counts: exactly
                    assert b[key] == a[key], (name, key)
        assert _csv(tmp_path / name / "eval_all_classes.csv") == _csv(
            tmp_path / "one" / "eval_all_classes.csv"
        )
        best = json.loads((tmp_path / name / "best_checkpoint.json").read_text())
        assert (
            best["checkpoint"]
            == json.loads((tmp_path / "one" / "best_checkpoint.json").read_text())["checkpoint"]
        )
    # no rank held the whole model: each holds its half of the partitions between forward passes
    share = re.search(
        r"ZeRO-3: the ([\d,]+) weights partitioned over 2 processes; rank 0 holds ([\d,]+)", said["zero3"]
    )
    total, held = (int(share.group(i).replace(",", "")) for i in (1, 2))
    assert held <= total * 0.55
    assert "ZeRO-3" not in said["ddp"]

    # launched by torchrun, as on a cluster: the same numbers
    out = _child(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "qwen_cls",
        "evaluate",
        "--checkpoint_path",
        str(no_eval_run / "checkpoint-20"),
        "--eval_data",
        str(data),
        "--output",
        str(tmp_path / "e.json"),
        "--devices",
        "2",
        "--strategy",
        "deepspeed_stage_3",
        "--accelerator",
        "cpu",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    single = json.loads((tmp_path / "e.json").read_text())
    assert single["overall_samples"] == 91
    assert single["overall_accuracy"] == float(one[1]["overall_accuracy"])
    assert single["overall_macro_f1"] == float(one[1]["overall_macro_f1"])
    assert single["overall_loss"] == pytest.approx(float(one[1]["overall_loss"]), abs=1e-6)
    assert (tmp_path / "e.classes.csv").is_file() and (tmp_path / "e.confusion.mnist.png").is_file()


def test_a_kill_during_evaluate_all_keeps_the_rows_written(no_eval_run, demo_data, tmp_path):
    out = tmp_path / "eval"
    val = str(demo_data / "val.jsonl")
    process = start_qwen_cls(
        "evaluate-all", str(no_eval_run), "--eval_data", val, "--output_dir", str(out), "--wandb", "false"
    )
    deadline = time.monotonic() + 300
    while not ((out / "eval_all.csv").is_file() and len(_csv(out / "eval_all.csv")) >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "evaluate-all wrote no row"
        time.sleep(0.02)
    process.kill()
    process.wait()
    kept = _csv(out / "eval_all.csv")
    assert [r["step"] for r in kept] == ["10", "20"][: len(kept)] and len(kept) < 3
    assert {r["step"] for r in _csv(out / "eval_all_classes.csv")} == {r["step"] for r in kept}
    assert json.loads((out / "best_checkpoint.json").read_text())["step"] in {int(r["step"]) for r in kept}
    assert not list(out.glob(".*.tmp"))
    # started again, it evaluates them all; the rows the kill kept are the same numbers
    rows = evaluate_all(str(no_eval_run), eval_data=val, output_dir=str(out), wandb=False)
    assert [r["step"] for r in rows] == [10, 20, 30]
    for old, new in zip(kept, _csv(out / "eval_all.csv"), strict=False):
        assert old == new


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "deepspeed_stage_2"], "--strategy: deepspeed_stage_2 does not partition the weights"),
        (["--strategy", "fsdp"], "--strategy: 'fsdp' cannot evaluate here; choose one of auto, ddp"),
        (["--devices", "4", "--eval_data", "THREE"], "--devices: 4 processes for the 3 rows of"),
        (["--devices", "0"], "--devices: a number >= 1 or auto, got 0"),
        (["--metric", "overall_f1"], "--metric: unknown metric 'overall_f1'; choose one of overall_accuracy"),
    ],
)
def test_bad_evaluation_settings_are_one_line_each(no_eval_run, demo_data, tmp_path, capsys, args, message):
    three = tmp_path / "three.jsonl"
    three.write_text(
        "".join((demo_data / "val.jsonl").read_text().splitlines(keepends=True)[:3]).replace(
            '"images/', f'"{demo_data}/images/'
        )
    )
    args = [str(three) if a == "THREE" else a for a in args]
    if "--eval_data" not in args:
        args += ["--eval_data", str(three)]
    code, _, err = run_main(
        capsys, "evaluate-all", str(no_eval_run), "--output_dir", str(tmp_path / "o"), *args
    )
    assert code == 2 and err.strip().startswith(f"qwen-cls: error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

"""Bad input stops before training with one line; full disks, crashes and kills lose nothing complete."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import qwen_cls.checkpoint as checkpoint_module
from qwen_cls.cli import main
from qwen_cls.errors import CheckpointError
from qwen_cls.evaluation import evaluate
from qwen_cls.modeling import MODEL_INPUTS, QwenVLForImageClassification
from qwen_cls.reporting import write_report
from qwen_cls.run_dir import has_state, list_checkpoints, run_status
from qwen_cls.train import run_lightning_cli
from tests.helpers import base_config, losses_by_step, start_qwen_cls, write_config

pytestmark = pytest.mark.slow


def fit_cli(tmp_path: Path, config: dict, *extra: str, capsys=None) -> tuple[int, str]:
    """Run `qwen-cls fit` in-process as the console script does; the exit status and the last stderr line."""
    path = write_config(tmp_path / "config.yaml", config)
    try:
        main(["fit", "--config", str(path), *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines() if capsys else [""]
    return code, err[-1] if err else ""


def rows_file(tmp_path: Path, demo_data: Path, bad: str, at: int = 3) -> Path:
    rows = []
    for line in (demo_data / "train.jsonl").read_text().splitlines()[:8]:
        row = json.loads(line)
        rows.append(json.dumps({**row, "image_path": str(demo_data / row["image_path"])}))
    rows.insert(at - 1, bad)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def bad_image_files(tmp_path: Path, demo_data: Path) -> tuple[Path, Path]:
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((demo_data / "images" / "00000.png").read_bytes()[:60])
    return not_image, truncated


BAD_ROWS = [
    ('{"image_path": "x.png", "label": 1', "malformed JSON"),
    ('{"label": 1, "dataset_name": "mnist"}', "missing 'image_path'"),
    ('{"image_path": "IMG", "dataset_name": "mnist"}', "'label' must be an integer"),
    ('{"image_path": "IMG", "label": 2.5, "dataset_name": "mnist"}', "'label' must be an integer"),
    ('{"image_path": "IMG", "label": 11, "dataset_name": "mnist"}', "label 11 out of range"),
    ('{"image_path": "IMG", "label": 1, "dataset_name": "food101"}', "unknown dataset 'food101'"),
    ('{"image_path": "/no/such/image.png", "label": 1, "dataset_name": "mnist"}', "image not found"),
    ('{"image_path": "NOT_IMAGE", "label": 1, "dataset_name": "mnist"}', "not a readable image"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_rows_exit_2_naming_file_and_line(tiny_model, demo_data, tmp_path, capsys, bad, message):
    not_image, _ = bad_image_files(tmp_path, demo_data)
    image = demo_data / "images" / "00000.png"
    train = rows_file(
        tmp_path, demo_data, bad.replace("NOT_IMAGE", str(not_image)).replace("IMG", str(image))
    )
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"]["train_jsonl"] = str(train)
    code, line = fit_cli(tmp_path, config, capsys=capsys)
    assert code == 2
    assert line.startswith(f"qwen-cls: error: {train}:3: ") and message in line
    assert not list((tmp_path / "run").glob("checkpoint-*")) if (tmp_path / "run").exists() else True


def test_undecodable_image_found_while_loading_names_file_and_line(tiny_model, demo_data, tmp_path, capsys):
    """A truncated PNG passes the header check at start-up; decoding it in a worker stops the run cleanly."""
    _, truncated = bad_image_files(tmp_path, demo_data)
    train = rows_file(tmp_path, demo_data, json.dumps({"image_path": str(truncated), "label": 0}), at=1)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"].update(train_jsonl=str(train), num_workers=1)
    config["training"]["max_steps"] = 2
    code, line = fit_cli(tmp_path, config, capsys=capsys)
    assert code == 2
    assert line.startswith(f"qwen-cls: error: {train}:1: cannot decode image {truncated}")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_undecodable_images_can_be_skipped_and_are_counted(tiny_model, demo_data, tmp_path):
    _, truncated = bad_image_files(tmp_path, demo_data)
    train = rows_file(tmp_path, demo_data, json.dumps({"image_path": str(truncated), "label": 0}), at=1)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"].update(train_jsonl=str(train), on_bad_image="skip", batch_size=9)
    config["training"].update(epochs=2, max_steps=2, save_steps=2)
    path = write_config(tmp_path / "c.yaml", config)
    with pytest.warns(UserWarning, match="2 unreadable images were skipped"):
        run_lightning_cli(["fit", "--config", str(path)])
    info = json.loads((tmp_path / "run" / "checkpoint-2" / "training_info.json").read_text())
    assert info["skipped_images"] == 2  # the one bad row, in each of the two epochs of 9 rows
    assert info["samples_seen"] == 16


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"model": {"num_labels": 5}},
            "model.num_labels: 5 is smaller than datasets.dataset_configs.mnist.num_classes",
        ),
        (
            {"loss": {"type": "focal_loss"}},
            "loss.type: 'focal_loss' is not a choice; choose one of cross_entropy, label_smoothing, focal",
        ),
        ({"model": {"pretrained_name": "NOT_QWEN"}}, "qwen-cls fine-tunes Qwen2-VL (qwen2_vl), Qwen2.5-VL"),
        ({"training": {"output_dir": "UNDER_A_FILE"}}, "is not writable"),
        (
            {"best_model_tracking": {"metric": "f1"}, "training": {"skip_evaluation": False}},
            "best_model_tracking.metric",
        ),
    ],
)
def test_bad_config_values_exit_2_naming_the_key(tiny_model, demo_data, tmp_path, capsys, change, message):
    not_qwen = tmp_path / "llama"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "a_file").write_text("")
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    for section, values in change.items():
        values = {k: str(not_qwen) if v == "NOT_QWEN" else v for k, v in values.items()}
        values = {
            k: str(tmp_path / "a_file" / "run") if v == "UNDER_A_FILE" else v for k, v in values.items()
        }
        config.setdefault(section, {}).update(values)
    code, line = fit_cli(tmp_path, config, capsys=capsys)
    assert code == 2 and message in line, line
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoint-*"))


def test_unknown_config_key_exits_2_naming_it(tiny_model, demo_data, tmp_path, capsys):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"]["warmup_ratio"] = 0.1
    path = write_config(tmp_path / "c.yaml", config)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path)])
    assert exit_.value.code == 2 and "warmup_ratio" in capsys.readouterr().err


def fake_free_space(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage._replace(free=free))


def test_disk_preflight_stops_before_step_1_and_suggests_keep_state_last_n(
    tiny_model, demo_data, tmp_path, capsys, monkeypatch
):
    fake_free_space(monkeypatch, 12 * 2**20)  # 12 MiB; one tiny checkpoint is ~5 MiB, this run keeps 3
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    code, line = fit_cli(tmp_path, config, capsys=capsys)
    assert code == 2
    assert "training.disk_check: this run will keep 3 checkpoints" in line and "3 resumable states" in line
    assert "set training.keep_state_last_n: 1" in line
    assert "keep_last_n" not in line.replace("keep_state_last_n", "")  # no-evaluation mode keeps every folder
    assert not list((tmp_path / "run").glob("checkpoint-*"))

    config["training"]["keep_state_last_n"] = 1  # the remedy: every hf_model/, one state
    assert fit_cli(tmp_path, config, capsys=capsys)[0] == 0
    kept = list_checkpoints(tmp_path / "run")
    assert [(p.name, has_state(p)) for p in kept] == [
        ("checkpoint-5", False),
        ("checkpoint-10", False),
        ("checkpoint-12", True),
    ]

    # standard mode without save_all_checkpoints may keep fewer folders: keep_last_n is offered and works
    standard = {"skip_evaluation": False, "keep_state_last_n": None, "output_dir": str(tmp_path / "standard")}
    config["training"].update(standard)
    config["evaluation"] = {"partial_eval_during_training": False, "full_eval_at_end": False}
    code, line = fit_cli(tmp_path, config, capsys=capsys)
    assert code == 2 and "training.keep_last_n (e.g. 1)" in line
    config["training"]["keep_last_n"] = 1
    assert fit_cli(tmp_path, config, capsys=capsys)[0] == 0
    assert [p.name for p in list_checkpoints(tmp_path / "standard")] == ["checkpoint-12"]

    config["training"].update(keep_last_n=None, disk_check="warn", output_dir=str(tmp_path / "warned"))
    with pytest.warns(UserWarning, match="this run will keep 3 checkpoints"):
        assert fit_cli(tmp_path, config, capsys=capsys)[0] == 0


def test_a_crash_while_saving_leaves_earlier_checkpoints_whole_and_resumable(
    tiny_model, demo_data, tmp_path, monkeypatch
):
    real_write = checkpoint_module.write_info

    crash_at = {"step": 10}

    def crash_on_step_10(path, info):
        if info.step == crash_at["step"]:
            raise OSError(28, "No space left on device")  # the disk fills up in the middle of the save
        real_write(path, info)

    monkeypatch.setattr(checkpoint_module, "write_info", crash_on_step_10)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", config)
    with pytest.raises(
        CheckpointError,
        match="checkpoint-10: writing the checkpoint failed: OSError.*No space left.*the checkpoints before it are "
        "complete \\(resume from checkpoint-5 with --ckpt_path last\\)",
    ):
        run_lightning_cli(["fit", "--config", str(path)])
    run = tmp_path / "run"
    assert (run / "checkpoint-5" / "training_info.json").is_file()
    assert not (run / "checkpoint-10").exists()  # nothing that looks complete
    assert (run / ".checkpoint-10.tmp" / "hf_model").is_dir() and not (
        run / ".checkpoint-10.tmp" / "training_info.json"
    ).exists()
    with pytest.warns(UserWarning, match="did not finish"):
        assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5"]

    crash_at["step"] = 5  # the first save fails: no earlier checkpoint to speak of
    config["training"]["output_dir"] = str(tmp_path / "first")
    with pytest.raises(CheckpointError, match="no checkpoint of this run is complete yet"):
        run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "first.yaml", config))])
    monkeypatch.undo()
    cli = run_lightning_cli(["fit", "--config", str(path), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 12
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5", "checkpoint-10", "checkpoint-12"]


def test_resume_after_sigkill_continues_exactly(tiny_model, demo_data, tmp_path):
    """20 steps straight vs 10 steps, SIGKILL, resume for 10: the same per-step losses and final weights."""
    config = base_config(tiny_model, demo_data, tmp_path / "straight")
    config["training"].update(max_steps=20, save_steps=10, logging_steps=1)
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "straight.yaml", config))])

    config["training"]["output_dir"] = str(tmp_path / "killed")
    config["monitor"] = {"plots": True}  # redrawn at each checkpoint, also on a machine without a spare core
    killed_cfg = write_config(tmp_path / "killed.yaml", config)
    proc = start_qwen_cls("fit", "--config", str(killed_cfg))
    marker = tmp_path / "killed" / "checkpoint-10" / "training_info.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    running = run_status(tmp_path / "killed", list_checkpoints(tmp_path / "killed"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoint-20").exists(), "the run finished before it could be killed"
    assert running == "in progress"
    # the metrics log on disk reaches the checkpoint (flushed when it was saved), so the report has curves
    assert set(range(1, 10)) <= set(losses_by_step(tmp_path / "killed"))
    # and the plots, redrawn from it at checkpoint-10 (by a process of their own, which the kill spared)
    loss_png = tmp_path / "killed" / "plots" / "loss.png"
    deadline = time.monotonic() + 120
    while not loss_png.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with Image.open(loss_png) as png:
        assert json.loads(png.text["Description"])["points"]["train/loss"] >= 9
    report = write_report(str(tmp_path / "killed")).read_text()
    assert "**Stopped before the end** (killed or crashed) at step 10 of 20" in report

    run_lightning_cli(["fit", "--config", str(killed_cfg), "--ckpt_path", "last"])
    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "killed")
    assert sorted(straight) == list(range(1, 21)) and set(range(11, 21)) <= set(resumed)
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    a = load_file(tmp_path / "straight" / "checkpoint-20" / "hf_model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint-20" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(no_eval_checkpoint, demo_data, tmp_path, capsys):
    run, config_path = no_eval_checkpoint
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "checkpoint-12"
    shutil.copytree(run / "checkpoint-12", evil)
    shutil.rmtree(evil / "hf_model")
    with (evil / "deepspeed" / "state.ckpt").open("wb") as fh:
        pickle.dump({"state_dict": _Exploit(marker)}, fh)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        evaluate(str(evil), str(demo_data / "val.jsonl"))
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(config_path),
                "--ckpt_path",
                str(evil),
                "--training.output_dir",
                str(tmp_path / "evil"),
            ]
        )
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert not marker.exists()


@pytest.fixture(scope="module")
def no_eval_checkpoint(tiny_model, demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    config = base_config(tiny_model, demo_data, tmp / "run")
    path = write_config(tmp / "c.yaml", config)
    run_lightning_cli(["fit", "--config", str(path)])
    return tmp / "run", path


def test_a_non_finite_loss_stops_the_run_naming_step_and_dataset(tiny_model, demo_data, tmp_path, capsys):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"].update(lr=1e12, max_grad_norm=0.0)  # the first update wrecks the weights
    code, line = fit_cli(tmp_path, config, capsys=capsys)
    assert code == 2
    assert "training step 2 (epoch 0, batch 1): the loss is nan on a batch of dataset(s) mnist" in line
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == []

    # skip_step: a skipped batch updates nothing (its step still counts, so the schedule stays on the data)
    ninth = json.dumps({"image_path": str(demo_data / "images" / "00000.png"), "label": 0})
    config["data"]["train_jsonl"] = str(rows_file(tmp_path, demo_data, ninth))
    config["data"]["batch_size"] = 3
    config["training"].update(on_nonfinite_loss="skip_step", output_dir=str(tmp_path / "skip"))
    with pytest.warns(UserWarning, match="non-finite loss on dataset"):
        assert fit_cli(tmp_path, config, capsys=capsys)[0] == 0
    info = json.loads((tmp_path / "skip" / "checkpoint-3" / "training_info.json").read_text())
    assert info["step"] == 3 and info["skipped_steps"] == 2


def test_arcface_trains_a_cosine_head_that_hf_model_reproduces(tiny_model, demo_data, tmp_path):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["loss"] = {"type": "arcface", "margin": 0.2, "scale": 16.0}
    config["training"].update(max_steps=4, save_steps=4)
    cli = run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    reloaded = QwenVLForImageClassification.from_pretrained(
        tmp_path / "run" / "checkpoint-4" / "hf_model"
    ).eval()
    assert reloaded.config.classifier_head == "cosine" and reloaded.config.cosine_scale == 16.0
    batch = next(iter(cli.datamodule.train_dataloader()))
    with torch.no_grad():
        trained = cli.model.eval()(batch)
        logits = reloaded(**{k: batch[k] for k in MODEL_INPUTS}).logits
    assert (trained - logits).abs().max() <= 1e-5
    assert logits.abs().max() <= 16.0 + 1e-4  # scaled cosines


def test_two_datasets_train_with_label_smoothing_and_masking(tiny_model, demo_data, tmp_path):
    rows = []
    for i, line in enumerate((demo_data / "train.jsonl").read_text().splitlines()[:64]):
        row = json.loads(line)
        image = str(demo_data / row["image_path"])
        rows.append(
            {"image_path": image, "label": row["label"], "dataset_name": "digits"}
            if i % 2
            else {"image_path": image, "label": row["label"] % 3, "dataset_name": "mod3"}
        )
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["datasets"]["dataset_configs"] = {"digits": {"num_classes": 10}, "mod3": {"num_classes": 3}}
    config["loss"] = {"type": "label_smoothing", "smoothing": 0.1}
    config["data"]["train_jsonl"] = str(data)
    config["training"].update(max_steps=6, save_steps=6, logging_steps=1)
    config["wandb"] = {"log_dataset_metrics": True}
    cli = run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    losses = losses_by_step(tmp_path / "run")
    assert len(losses) == 6 and all(v == v and v < 10 for v in losses.values())  # finite, no inf or NaN
    with Image.open(tmp_path / "run" / "plots" / "loss.png") as png:  # one line per dataset in the plot
        assert json.loads(png.text["Description"])["points"] == {
            "train/loss": 6,
            "train/digits_loss": 6,
            "train/mod3_loss": 6,
        }
    batch = next(iter(cli.datamodule.train_dataloader()))
    with torch.no_grad():
        logits = cli.model.eval()(batch)
    predictions = logits.masked_fill(~cli.model.valid_classes(batch["dataset_idx"]), float("-inf")).argmax(-1)
    mod3 = batch["dataset_idx"] == 1
    assert mod3.any() and (predictions[mod3] < 3).all()

"""What real users' inputs and clusters do to a run: hub-cache paths, 16-bit and odd images, SIGTERM, two runs
in one folder, resumes with a changed config, and the start-up checks. Each ends as one line before training
(or a correct result), never a traceback, a silent wrong result or lost work."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qwen_cls.cli import main
from qwen_cls.images import to_rgb
from qwen_cls.policy import resume_changes
from qwen_cls.predict import predict
from qwen_cls.reporting import write_report
from qwen_cls.run_dir import RUNNING_FILE, replace_folder, restore_set_aside, run_status
from qwen_cls.train import run_lightning_cli
from tests.helpers import REPO, base_config, child_env, losses_by_step, write_config

HEX = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as in the Hugging Face cache


def fit_line(tmp_path: Path, config: dict, capsys, *extra: str) -> tuple[int, str]:
    """`qwen-cls fit` in-process as the console script runs it: exit status and the last stderr line."""
    try:
        main(["fit", "--config", str(write_config(tmp_path / "config.yaml", config)), *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def small_rows(demo_data: Path, path: Path, n: int = 16, extra: list[str] | None = None) -> Path:
    lines = (demo_data / "train.jsonl").read_text().splitlines()[:n]
    rows = [
        json.dumps({**json.loads(r), "image_path": str(demo_data / json.loads(r)["image_path"])})
        for r in lines
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows + (extra or [])) + "\n")
    return path


def image_row(path: Path, label: int = 1) -> str:
    return json.dumps({"image_path": str(path), "label": label, "dataset_name": "mnist"})


# 1. hub-cache paths are paths; only the real key is refused


@pytest.mark.slow
def test_hub_cache_model_data_and_output_dir_are_used_as_given(tiny_model, demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", HEX[::-1])  # present in the environment: never copied anywhere
    model = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct" / "snapshots" / HEX
    shutil.copytree(tiny_model, model)
    data = small_rows(
        demo_data, tmp_path / "hub" / "datasets--me--digits" / "snapshots" / HEX / "train.jsonl"
    )
    out = tmp_path / "runs" / HEX
    config = base_config(model, demo_data, out)
    config["data"]["train_jsonl"] = str(data)
    config["training"].update(max_steps=2, save_steps=2)
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    info = json.loads((out / "checkpoint-2" / "training_info.json").read_text())
    assert info["config"]["model"]["pretrained_name"] == str(model)
    assert info["config"]["data"]["train_jsonl"] == str(data)
    assert info["config"]["training"]["output_dir"] == str(out)
    assert not (tmp_path / "runs" / "<redacted>").exists()
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".csv")]
    assert written and not any(HEX[::-1] in p.read_text() for p in written)


@pytest.mark.slow
def test_a_config_value_holding_the_wandb_key_is_refused_not_rewritten(
    tiny_model, demo_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WANDB_API_KEY", HEX)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["wandb"] = {"notes": f"key {HEX}"}
    code, line = fit_line(tmp_path, config, capsys)
    assert code == 2
    assert line.startswith("qwen-cls: error: wandb.notes: holds the W&B API key of WANDB_API_KEY; remove it")
    assert HEX not in line and not (tmp_path / "run").exists()


# 2. images: 16-bit, transparency, EXIF orientation


def test_16_bit_grey_levels_are_scaled_not_binarised(tmp_path):
    ramp = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as im:
        assert im.mode.startswith("I")
        converted = np.asarray(to_rgb(im))
    assert converted.shape == (4, 4, 3) and converted.dtype == np.uint8
    assert converted[..., 0].ravel().tolist() == list(range(0, 256, 17))  # convert("RGB") gave 0,255,255,...


def test_transparency_is_composited_on_white_and_exif_orientation_applied(tmp_path):
    icon = Image.new("LA", (3, 3), (0, 0))  # an alpha-only image: the shape is in the alpha channel
    icon.putpixel((1, 1), (0, 255))
    grey = np.asarray(to_rgb(icon))[..., 0]
    assert grey[1, 1] == 0 and (grey.sum() == 8 * 255)  # black shape on white, not an all-black square
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0].tolist() == [[255, 0, 0], [255, 255, 255]]
    wide = Image.new("RGB", (4, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo taken upright
    wide.save(tmp_path / "phone.jpg", exif=exif)
    with Image.open(tmp_path / "phone.jpg") as im:
        assert im.size == (4, 2) and to_rgb(im).size == (2, 4)


# 5. images the processor refuses, and decompression bombs


@pytest.mark.slow
def test_extreme_aspect_ratio_and_decompression_bomb_stop_before_training(
    tiny_model, demo_data, tmp_path, capsys, monkeypatch
):
    strip = tmp_path / "strip.png"
    Image.new("L", (250, 1)).save(strip)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"]["train_jsonl"] = str(small_rows(demo_data, tmp_path / "a.jsonl", 4, [image_row(strip)]))
    code, line = fit_line(tmp_path, config, capsys)
    assert code == 2
    assert line.startswith(
        f"qwen-cls: error: {tmp_path / 'a.jsonl'}:5: {strip}: 250x1 pixels, an aspect ratio of 250:1"
    )

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 28x28 digit is now over twice the limit
    config["data"]["train_jsonl"] = str(small_rows(demo_data, tmp_path / "b.jsonl", 1))
    code, line = fit_line(tmp_path, config, capsys)
    assert code == 2
    assert line.startswith(f"qwen-cls: error: {tmp_path / 'b.jsonl'}:1: not a readable image")
    assert "decompression bomb" in line
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
def test_predict_reports_a_refused_image_and_keeps_the_others(no_eval_run, demo_data, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("00000.png", "00001.png"):
        shutil.copy(demo_data / "images" / name, folder / name)
    Image.new("L", (300, 1)).save(folder / "strip.png")
    failed = predict(str(no_eval_run / "checkpoint-4"), str(folder), output=str(tmp_path / "p.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert failed == 1 and len(lines) == 3
    by_name = {Path(r["input"]).name: r for r in lines}
    assert "aspect ratio of 300:1" in by_name["strip.png"]["error"]
    assert all("labels" in by_name[n] for n in ("00000.png", "00001.png"))


@pytest.fixture(scope="module")
def no_eval_run(tiny_model, demo_data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("field")
    config = base_config(tiny_model, demo_data, tmp / "run")
    config["training"].update(max_steps=4, save_steps=2, logging_steps=1)
    run_lightning_cli(["fit", "--config", str(write_config(tmp / "c.yaml", config))])
    return tmp / "run"


# 3. SIGTERM: a checkpoint of the current step, a non-zero exit, exact resume


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_nonzero_and_resumes_exactly(tiny_model, demo_data, tmp_path):
    config = base_config(tiny_model, demo_data, tmp_path / "straight")
    config["training"].update(max_steps=8, save_steps=5, logging_steps=1)
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "straight.yaml", config))])

    config["training"]["output_dir"] = str(tmp_path / "stopped")
    path = write_config(tmp_path / "stopped.yaml", config)
    signalled = json.loads(json.dumps(config))
    signalled["trainer"]["callbacks"] = [
        {"class_path": "tests.helpers.SignalAtStep", "init_args": {"step": 3, "signal": "SIGTERM"}}
    ]
    out = subprocess.run(
        [sys.executable, "-m", "qwen_cls", "fit", "--config", str(write_config(tmp_path / "sig.yaml", signalled))],
        cwd=REPO, capture_output=True, text=True, env=child_env(),
    )  # fmt: skip
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert re.search(
        r"stopped by SIGTERM at step 3: checkpoint-3 is complete \([\d.]+ s after the signal\)", out.stdout
    )
    run = tmp_path / "stopped"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]  # save_steps is 5
    info = json.loads((run / "checkpoint-3" / "training_info.json").read_text())
    assert (info["step"], info["stopped_by"], info["final"]) == (3, "SIGTERM", False)
    assert not (run / RUNNING_FILE).exists()
    assert run_status(run, [run / "checkpoint-3"]) == "stopped by SIGTERM"
    assert "**Stopped by signal** (SIGTERM) at step 3 of 8" in write_report(str(run)).read_text()

    run_lightning_cli(["fit", "--config", str(path), "--ckpt_path", "last"])
    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(run)
    assert set(range(4, 9)) <= set(resumed)
    for step in range(4, 9):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    a = load_file(tmp_path / "straight" / "checkpoint-8" / "hf_model" / "model.safetensors")
    b = load_file(run / "checkpoint-8" / "hf_model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# 4. two runs into one output_dir


@pytest.mark.slow
def test_a_second_fit_into_a_running_output_dir_is_refused_naming_the_first(
    tiny_model, demo_data, tmp_path, capsys
):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"].update(max_steps=4, save_steps=2, overwrite_output_dir=True)
    first = json.loads(json.dumps(config))
    go = tmp_path / "go"
    first["trainer"]["callbacks"] = [
        {"class_path": "tests.helpers.PauseAtStep", "init_args": {"step": 3, "resume_file": str(go)}}
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_cls", "fit", "--config", str(write_config(tmp_path / "first.yaml", first))],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp_path / "first.err").open("w"), env=child_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint-2").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "run" / "checkpoint-2").exists()
        code, line = fit_line(tmp_path, config, capsys)  # overwrite_output_dir would delete its checkpoints
        assert code == 2
        assert line.startswith(
            f"qwen-cls: error: training.output_dir: {tmp_path / 'run'} is being trained by another qwen-cls fit "
            f"(pid {proc.pid} on {socket.gethostname()}, started "
        )
        assert (tmp_path / "run" / "checkpoint-2").exists()
    finally:
        go.touch()
        proc.wait(timeout=300)
    assert proc.returncode == 0, (tmp_path / "first.err").read_text()[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "run" / RUNNING_FILE).exists()


@pytest.mark.slow
def test_a_stale_marker_of_a_dead_process_is_taken_over_with_a_warning(tiny_model, demo_data, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / RUNNING_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    config = base_config(tiny_model, demo_data, run)
    config["training"].update(max_steps=2, save_steps=2)
    with pytest.warns(UserWarning, match=f"taking over from a run that is gone \\(pid {dead.pid} on"):
        run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    assert (run / "checkpoint-2").is_dir() and not (run / RUNNING_FILE).exists()


# 6. resume with a changed config


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message", "hint"),
    [
        (
            ("data", "batch_size", 4),
            "data.batch_size: 8 -> 4 (it decides which rows each step trains on)",
            "",
        ),
        (
            ("model", "num_labels", 12),
            "model.num_labels: 10 -> 12 (it decides the head's shape)",
            ", model.reinit_head: true",
        ),
    ],
)
def test_resume_refuses_a_change_of_data_order_or_shapes(
    no_eval_run, tmp_path, capsys, change, message, hint
):
    run = tmp_path / "run"
    shutil.copytree(no_eval_run, run)
    config = json.loads((run / "checkpoint-2" / "training_info.json").read_text())["config"]
    resumed = base_config(
        Path(config["model"]["pretrained_name"]), Path(config["data"]["train_jsonl"]).parent, run
    )
    section, key, value = change
    resumed[section][key] = value
    code, line = fit_line(tmp_path, resumed, capsys, "--ckpt_path", str(run / "checkpoint-2"))
    assert code == 2
    assert (
        line
        == f"qwen-cls: error: ckpt_path: resuming checkpoint-2 with {message}; keep the saved value(s), or start a new run from its hf_model/ (model.pretrained_name{hint})"
    )


@pytest.mark.slow
def test_resume_reports_a_changed_learning_rate_and_goes_on(no_eval_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(no_eval_run, run)
    config = json.loads((run / "checkpoint-2" / "training_info.json").read_text())["config"]
    resumed = base_config(
        Path(config["model"]["pretrained_name"]), Path(config["data"]["train_jsonl"]).parent, run
    )
    resumed["training"].update(max_steps=4, save_steps=2, logging_steps=1, lr=1e-3)
    main(
        [
            "fit",
            "--config",
            str(write_config(tmp_path / "r.yaml", resumed)),
            "--ckpt_path",
            str(run / "checkpoint-2"),
        ]
    )
    line = next(
        x
        for x in capsys.readouterr().out.splitlines()
        if "resuming checkpoint-2 with changed settings: " in x
    )
    assert (
        "with changed settings: training.lr: 0.002 -> 0.001;" in line
        and "(the optimizer state and the learning-rate schedule" in line
    )
    assert (run / "checkpoint-4" / "training_info.json").is_file()


def test_resume_changes_table():
    saved = {"data": {"batch_size": 8, "train_jsonl": "a.jsonl"}, "training": {"lr": 1e-3}, "seed_everything": 1,
             "datasets": {"dataset_configs": {"a": {"num_classes": 3}}}, "config": ["x.yaml"]}  # fmt: skip
    same = json.loads(json.dumps(saved))
    assert resume_changes(saved, same, 2, 2) == ([], [])
    now = json.loads(json.dumps(saved))
    now["training"]["lr"] = 2e-3
    now["config"] = ["y.yaml"]
    assert resume_changes(saved, now, 2, 2) == ([], ["training.lr: 0.001 -> 0.002"])
    now["seed_everything"] = 2
    now["datasets"]["dataset_configs"]["a"]["num_classes"] = 4
    refused, _ = resume_changes(saved, now, 2, 4)
    assert [r.split(":")[0] for r in refused] == [
        "datasets.dataset_configs",
        "seed_everything",
        "trainer.devices x trainer.num_nodes",
    ]
    # LoRA: turning it on or off, or changing what carries adapters, is refused; a default written out is no change
    plain = {**json.loads(json.dumps(saved)), "model": {"lora": None}}
    unset = {**json.loads(json.dumps(saved)), "model": {"lora": {"enabled": False, "r": 16}}}
    assert resume_changes(plain, unset, 2, 2) == ([], [])
    adapted = {**json.loads(json.dumps(saved)), "model": {"lora": {"enabled": True, "r": 16}}}
    assert "model.lora.enabled" in [r.split(":")[0] for r in resume_changes(plain, adapted, 2, 2)[0]]
    wider = {**json.loads(json.dumps(saved)), "model": {"lora": {"enabled": True, "r": 32}}}
    assert [r.split(":")[0] for r in resume_changes(adapted, wider, 2, 2)[0]] == ["model.lora.r"]


# 7. a best-model metric of a dataset without validation rows


@pytest.mark.slow
def test_best_metric_of_a_dataset_without_validation_rows_stops_before_step_1(
    tiny_model, demo_data, tmp_path, capsys
):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["datasets"]["dataset_configs"]["letters"] = {"num_classes": 5}
    config["data"]["train_jsonl"] = str(small_rows(demo_data, tmp_path / "t.jsonl"))
    config["data"]["val_jsonl"] = str(small_rows(demo_data, tmp_path / "v.jsonl"))
    config["training"].update(skip_evaluation=False, eval_steps=5, save_steps=5)
    config["best_model_tracking"] = {"enabled": True, "metric": "letters_accuracy"}
    code, line = fit_line(tmp_path, config, capsys)
    assert code == 2
    assert line == (
        "qwen-cls: error: best_model_tracking.metric: letters_accuracy needs validation rows of dataset 'letters', "
        "but data.val_jsonl has none; choose an overall_* metric or add its rows"
    )
    assert not list((tmp_path / "run").glob("checkpoint-*"))


# 8. start-up checks


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--training.lr=-1e-3"], "training.lr: must be > 0, got -0.001"),
        (["--training.lr=0"], "training.lr: must be > 0, got 0.0"),
        (["--training.warmup_steps=-5"], "training.warmup_steps: must be >= 0, got -5.0"),
        (
            ["--training.max_steps=0"],
            "training.max_steps: 0 trains nothing; use a positive number, or -1 for all epochs",
        ),
    ],
)
def test_values_that_would_train_nothing_are_config_errors(
    tiny_model, demo_data, tmp_path, capsys, extra, message
):
    code, line = fit_line(tmp_path, base_config(tiny_model, demo_data, tmp_path / "run"), capsys, *extra)
    assert (code, line) == (2, f"qwen-cls: error: {message}")


@pytest.mark.slow
def test_bad_data_files_name_the_file_and_line(tiny_model, demo_data, tmp_path, capsys):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    latin1 = small_rows(demo_data, tmp_path / "latin1.jsonl", 2)
    latin1.write_bytes(latin1.read_bytes() + '{"image_path": "caf\xe9.png", "label": 1}\n'.encode("latin-1"))
    config["data"]["train_jsonl"] = str(latin1)
    code, line = fit_line(tmp_path, config, capsys)
    assert (code, line) == (
        2,
        f"qwen-cls: error: {latin1}:3: not UTF-8 text (invalid continuation byte, byte 0xe9); save the file as UTF-8",
    )

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    config["data"]["train_jsonl"] = [str(small_rows(demo_data, tmp_path / "ok.jsonl", 2)), str(empty)]
    assert fit_line(tmp_path, config, capsys) == (2, f"qwen-cls: error: {empty}: no rows")

    folder = tmp_path / "a_folder.png"
    folder.mkdir()
    config["data"]["train_jsonl"] = str(small_rows(demo_data, tmp_path / "f.jsonl", 2, [image_row(folder)]))
    assert fit_line(tmp_path, config, capsys) == (
        2,
        f"qwen-cls: error: {tmp_path / 'f.jsonl'}:3: {folder} is a folder, not an image",
    )


def test_empty_and_broken_yaml_name_the_file(tmp_path, capsys):
    empty, broken = tmp_path / "empty.yaml", tmp_path / "broken.yaml"
    empty.write_text("# nothing yet\n")
    broken.write_text("model:\n  num_labels: 10\n  pretrained_name: [unclosed\ntraining:\n")
    for path, message in (
        (empty, f"--config: {empty} is empty"),
        (broken, f"--config: {broken}:4:9: YAML syntax error: expected ',' or ']', but got ':'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(path)])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and line.startswith(f"qwen-cls: error: {message}"), line


# 9. a step saved again replaces its folder safely


def test_a_kill_while_a_step_is_saved_again_leaves_one_whole_copy(tmp_path, monkeypatch):
    final, new = tmp_path / "checkpoint-4", tmp_path / ".checkpoint-4.tmp"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "training_info.json").write_text(text)
    real_replace, calls = os.replace, []

    def killed_after_setting_aside(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_setting_aside)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, final)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not final.exists()  # the old step is set aside, not deleted
    assert restore_set_aside(tmp_path) == [final]
    assert (final / "training_info.json").read_text() == "old"
    replace_folder(new, final)
    assert (final / "training_info.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]

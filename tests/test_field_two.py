"""Field-readiness, round two: what returned a wrong result without a word, stalled, or ended in a traceback when
tried as a new user would (changed rows at resume, an overwritten run's leftovers, keep-all that deleted, trainer
keys that a training key owns, W&B without a network, a watcher that never ended, odd inputs). Each case failed
before its fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qwen_cls.run_dir import RUN_RECORDS, list_checkpoints
from tests.helpers import base_config, run_main, write_config


def fit(tmp_path: Path, config: dict, capsys, *extra: str) -> tuple[int, str, str]:
    """`qwen-cls fit --config` in-process: exit status, stdout, and the last stderr line."""
    code, out, err = run_main(
        capsys, "fit", "--config", str(write_config(tmp_path / "c.yaml", config)), *extra
    )
    lines = err.strip().splitlines()
    return code, out, lines[-1] if lines else ""


def rows(demo_data: Path, path: Path, start: int, stop: int) -> Path:
    """Rows start..stop of the demo's training file, with absolute image paths."""
    lines = (demo_data / "train.jsonl").read_text().splitlines()[start:stop]
    path.write_text(
        "".join(
            json.dumps({**json.loads(r), "image_path": str(demo_data / json.loads(r)["image_path"])}) + "\n"
            for r in lines
        )
    )
    return path


# 1. a resume on rows that changed in place


@pytest.mark.slow
def test_resume_on_changed_rows_is_refused_unless_asked_and_a_touched_file_is_not_a_change(
    tiny_model, demo_data, tmp_path, capsys
):
    train = rows(demo_data, tmp_path / "train.jsonl", 0, 64)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"]["train_jsonl"] = str(train)
    config["training"].update(epochs=2, max_steps=6, save_steps=4)  # 8 steps an epoch: stopped within epoch 0
    assert fit(tmp_path, config, capsys)[0] == 0
    config["training"]["max_steps"] = -1

    os.utime(train, ns=(0, 0))  # touched, the same rows: resumes without a word about the data
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    touched = {**config, "training": {**config["training"], "output_dir": str(tmp_path / "copy")}}
    code, out, _ = fit(tmp_path, touched, capsys, "--ckpt_path", str(tmp_path / "copy" / "checkpoint-4"))
    assert code == 0 and "resume_with_changed_rows" not in out
    assert [p.name for p in list_checkpoints(tmp_path / "copy")][-1] == "checkpoint-16"

    with train.open("a") as fh:  # 16 rows appended
        fh.write(rows(demo_data, tmp_path / "more.jsonl", 64, 80).read_text())
    mid_epoch = str(tmp_path / "run" / "checkpoint-4")  # saved within epoch 0 (checkpoint-6 ended the run)
    code, _, line = fit(tmp_path, config, capsys, "--ckpt_path", mid_epoch)
    assert code == 2
    assert line == (
        f"qwen-cls: error: data.train_jsonl: {train} changed (64 rows then, 80 now) since the checkpoint was saved; "
        "its interrupted epoch was ordered over the old rows. Resume with the rows it was saved with, or set "
        "data.resume_with_changed_rows: true to go on with the new rows"
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-6"]

    code, out, _ = fit(
        tmp_path, config, capsys, "--ckpt_path", mid_epoch, "--data.resume_with_changed_rows", "true"
    )
    assert code == 0
    assert (
        f"data.resume_with_changed_rows: {train} changed (64 rows then, 80 now); the rest of the interrupted "
        "epoch is drawn from a shuffle of the new rows" in out
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "checkpoint-20"  # 2 epochs of 10 steps

    rows(demo_data, train, 0, 16)  # cut to 2 steps an epoch: the run would be past its end at step 6
    changed = ("--data.resume_with_changed_rows", "true")
    code, _, line = fit(
        tmp_path, config, capsys, "--ckpt_path", str(tmp_path / "run" / "checkpoint-6"), *changed
    )
    assert code == 2 and line == (
        "qwen-cls: error: ckpt_path: the checkpoint is at step 6, but this run's length is 4 steps (training.epochs "
        "x 2 batches an epoch, or training.max_steps); raise training.epochs or training.max_steps"
    )

    # the same rows under another name: the path change is reported, the rows are the same, the resume goes on
    moved = tmp_path / "moved.jsonl"
    shutil.copy(rows(demo_data, tmp_path / "t2.jsonl", 0, 64), moved)
    config["data"]["train_jsonl"] = str(tmp_path / "t2.jsonl")
    config["training"].update(output_dir=str(tmp_path / "run2"), max_steps=6)
    assert fit(tmp_path, config, capsys)[0] == 0
    config["training"]["max_steps"] = -1
    config["data"]["train_jsonl"] = str(moved)
    code, out, _ = fit(tmp_path, config, capsys, "--ckpt_path", str(tmp_path / "run2" / "checkpoint-4"))
    assert code == 0 and f"data.train_jsonl: '{tmp_path / 't2.jsonl'}' -> '{moved}'" in out


# 2. overwrite_output_dir takes the whole previous run along; 3. skip_evaluation keeps every checkpoint


@pytest.mark.slow
def test_overwrite_removes_every_record_of_the_old_run_and_keep_all_keeps_all(
    tiny_model, demo_data, val_subset, tmp_path, capsys
):
    run = tmp_path / "run"
    config = base_config(tiny_model, demo_data, run)
    config["training"].update(keep_last_n=2)  # skip_evaluation: every checkpoint is kept all the same
    config["monitor"] = {"plots": True}
    code, out, _ = fit(tmp_path, config, capsys)
    assert code == 0
    assert "training.skip_evaluation=true overrides training.keep_last_n: 2 -> null" in out
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5", "checkpoint-10", "checkpoint-12"]
    assert (
        run_main(capsys, "evaluate-all", str(run), "--eval_data", str(val_subset), "--wandb", "false")[0] == 0
    )
    assert run_main(capsys, "report", str(run))[0] == 0
    (run / "eval_final.json").write_text("{}")  # as a standard-mode run leaves it
    assert {p.name for p in run.iterdir()} >= set(RUN_RECORDS)  # the test covers every record a run keeps

    config["training"].update(max_steps=4, save_steps=2, overwrite_output_dir=True)
    code, out, _ = fit(tmp_path, config, capsys)
    assert code == 0
    assert (
        f"overwrite_output_dir: removed the previous run from {run}: 3 checkpoints (checkpoint-5..checkpoint-12), "
        "eval_all.csv, eval_all.png, best_checkpoint.json, eval_all_classes.csv, eval_all_best/, eval_final.json, "
        "report.md, plots/, logs/" in out
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "logs", "plots"]
    assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]
    code, out, _ = run_main(capsys, "report", str(run))
    report = (run / "report.md").read_text()
    assert "checkpoint-12" not in report and "checkpoint-4" in report


# 4. keys that a training key sets


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--trainer.max_epochs", "3"],
            "trainer.max_epochs: set by training.epochs; give --training.epochs instead",
        ),
        (
            ["--trainer.gradient_clip_val=1.0"],
            "trainer.gradient_clip_val: set by training.max_grad_norm; give --training.max_grad_norm instead",
        ),  # fmt: skip
        (
            ["--model.training.lr", "1e-4"],
            "model.training.lr: set by training.lr; give --training.lr instead",
        ),  # a section handed whole to the module
    ],
)
def test_a_key_a_training_key_sets_is_refused_on_the_command_line(tmp_path, capsys, args, line):
    code, _, err = run_main(capsys, "fit", *args)
    assert code == 2 and err.strip() == f"qwen-cls: error: {line}"


@pytest.mark.parametrize(
    ("section", "key", "value", "owner"),
    [
        ("trainer", "max_epochs", 3, "training.epochs"),
        ("trainer", "default_root_dir", "/tmp/x", "training.output_dir"),
        ("data", "processor_path", "/tmp/x", "model.pretrained_name"),
    ],
)
def test_a_key_a_training_key_sets_is_refused_in_yaml_and_in_the_python_api(
    tiny_model, demo_data, tmp_path, capsys, section, key, value, owner
):
    import qwen_cls
    from qwen_cls.errors import ConfigError

    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config[section][key] = value
    path = write_config(tmp_path / "c.yaml", config)
    code, _, err = run_main(capsys, "fit", "--config", str(path))
    assert code == 2
    assert (
        err.strip()
        == f"qwen-cls: error: {section}.{key}: set by {owner}; write {owner} in the config instead (--config: {path})"
    )
    with pytest.raises(ConfigError, match=f"^{section}.{key}: set by {owner}; write {owner}"):
        qwen_cls.fit(config)
    assert not (tmp_path / "run").exists()


# 7. one line, not a traceback


def test_version(capsys):
    from importlib.metadata import version

    assert run_main(capsys, "--version") == (0, f"qwen-cls {version('qwen-cls')}\n", "")


# 5. W&B with a key and no network


@pytest.fixture
def unanswering_wandb(monkeypatch):
    """A W&B server address that takes connections and never answers (a network that swallows requests), and
    a key: W&B would wait about two minutes, then fail the run."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield url
    server.close()


@pytest.mark.slow
def test_wandb_that_does_not_answer_is_offline_in_one_line_and_never_costs_a_result(
    tiny_model, demo_data, val_subset, tmp_path, capsys, unanswering_wandb
):
    run = tmp_path / "run"
    config = base_config(tiny_model, demo_data, run)
    config["training"].update(max_steps=4, save_steps=2)
    config["wandb"] = {"enabled": True, "project": "offline-test", "start_timeout": 2}
    code, out, _ = fit(tmp_path, config, capsys)
    assert code == 0
    went_offline = f"W&B: {unanswering_wandb} did not answer within 2 s (timed out); logging offline"
    assert went_offline in out
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    assert list((run / "wandb").glob("offline-run-*"))

    os.environ.pop("WANDB_MODE", None)  # Lightning's WandbLogger set it for the offline run in this process
    code, out, err = run_main(capsys, "evaluate-all", str(run), "--eval_data", str(val_subset))
    assert code == 0 and went_offline in out, err
    with (run / "eval_all.csv").open() as fh:
        assert [line.split(",")[0] for line in fh.read().splitlines()[1:]] == ["2", "4"]


# 6. evaluate-all --watch ends when the run has stopped, and refuses a folder that is no run


@pytest.mark.slow
def test_watch_stops_when_the_run_stopped_without_its_final_checkpoint(
    tiny_model, demo_data, val_subset, tmp_path, capsys
):
    finished = tmp_path / "finished"
    config = base_config(tiny_model, demo_data, finished)
    config["training"].update(max_steps=4, save_steps=2)
    assert fit(tmp_path, config, capsys)[0] == 0

    stopped = (
        tmp_path / "stopped"
    )  # what a SIGTERM leaves: the newest checkpoint says so, no fit holds the run
    shutil.copytree(finished, stopped)
    info_file = stopped / "checkpoint-4" / "training_info.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "final": False, "stopped_by": "SIGTERM"}))
    watch = ("--eval_data", str(val_subset), "--watch", "--poll_seconds", "0.2", "--wandb", "false")
    code, out, _ = run_main(capsys, "evaluate-all", str(stopped), *watch)
    assert code == 0
    assert (
        f"stopped watching {stopped}: the run was stopped by SIGTERM at checkpoint-4 and no fit holds it now; "
        "resume it (--ckpt_path last) and watch again" in out
    )
    assert (stopped / "eval_all.csv").read_text().count("\n") == 3

    crashed = tmp_path / "crashed"  # killed after checkpoint-2: no final checkpoint, no stop recorded
    shutil.copytree(finished, crashed)
    shutil.rmtree(crashed / "checkpoint-4")
    code, out, _ = run_main(capsys, "evaluate-all", str(crashed), *watch, "--stale_after", "1")
    assert code == 0
    assert (
        f"stopped watching {crashed}: no fit has trained into it for 1 s and its newest checkpoint is "
        "checkpoint-2, not final (killed or crashed?); resume it and watch again" in out
    )

    typo = tmp_path / "finsihed"
    code, _, err = run_main(capsys, "evaluate-all", str(typo), *watch)
    assert code == 2 and err.strip() == (
        f"qwen-cls: error: run_dir: {typo} is not a run folder (no checkpoint, no running fit); check the path, "
        "or add --wait_for_run to wait for a run to start there"
    )
    assert not typo.exists()


@pytest.mark.parametrize(
    ("remove", "line"),
    [
        (["tokenizer.json"], "lacks the tokenizer (tokenizer.json, or vocab.json + merges.txt); copy the whole model folder (the processor is loaded from it)"),
        (["model.safetensors"], "holds no weights (*.safetensors or pytorch_model*.bin); the copy or download is incomplete"),
        (["shard"], "lacks 1 of the 2 weight files its model.safetensors.index.json names (model-00002-of-00002.safetensors); the copy or download is incomplete"),
    ],
)  # fmt: skip
def test_a_partial_model_folder_is_one_line_before_training(
    tiny_model, demo_data, tmp_path, capsys, remove, line
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if remove == ["shard"]:  # a sharded download that stopped after the first shard
        index = {
            "metadata": {},
            "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
        }
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        os.replace(model / "model.safetensors", model / "model-00001-of-00002.safetensors")
    for name in remove if remove != ["shard"] else []:
        (model / name).unlink()
    config = base_config(model, demo_data, tmp_path / "run")
    code, _, err = fit(tmp_path, config, capsys)
    assert code == 2 and err == f"qwen-cls: error: model.pretrained_name: {model} {line}"
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_image_paths_home_file_urls_and_remote_urls(tmp_path, monkeypatch):
    from qwen_cls.config import DatasetConfig
    from qwen_cls.errors import DataError
    from qwen_cls.rows import read_rows

    home = tmp_path / "home"
    (home / "imgs").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(home / "imgs" / "a b.png")
    monkeypatch.setenv("HOME", str(home))
    data = tmp_path / "data" / "rows.jsonl"
    data.parent.mkdir()
    lines = [
        {"image_path": "~/imgs/a b.png", "label": 0},
        {"image_path": f"file://{home}/imgs/a%20b.png", "label": 1},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    datasets = {"d": DatasetConfig(num_classes=2)}
    assert [r.image_path for r in read_rows(data, datasets, processes=1)] == [home / "imgs" / "a b.png"] * 2

    with data.open("a") as fh:
        fh.write(json.dumps({"image_path": "https://example.com/c.png", "label": 0}) + "\n")
    with pytest.raises(DataError) as error:
        read_rows(data, datasets, processes=1)
    assert str(error.value) == (
        f"{data}:3: https:// images are not supported: download them and give local paths (absolute, relative to "
        "the JSONL file, ~/... or file://)"
    )


@pytest.mark.slow
def test_predict_with_no_readable_image_fails_and_export_refuses_a_file_as_output(
    tiny_model, demo_data, tmp_path, capsys
):
    run = tmp_path / "run"
    config = base_config(tiny_model, demo_data, run)
    config["training"].update(max_steps=2, save_steps=2)
    assert fit(tmp_path, config, capsys)[0] == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    code, out, err = run_main(capsys, "predict", "--checkpoint_path", str(run), "--inputs", str(bad))
    assert code == 2
    assert [json.loads(line)["input"] for line in out.splitlines()] == [
        str(bad / "a.png"),
        str(bad / "b.jpg"),
    ]
    assert (
        err.strip().splitlines()[-1]
        == f"qwen-cls: error: none of the 2 images could be read (the first: {bad / 'a.png'})"
    )

    for command, flag in (("predict", "--top_k"), ("predict", "--batch_size"), ("evaluate", "--batch_size")):
        data = (
            ("--inputs", str(bad)) if command == "predict" else ("--eval_data", str(demo_data / "val.jsonl"))
        )
        code, _, err = run_main(capsys, command, "--checkpoint_path", str(run), *data, flag, "0")
        assert code == 2 and err.strip() == f"qwen-cls: error: {flag}: must be >= 1, got 0"

    target = tmp_path / "model.safetensors"
    target.write_text("")
    code, _, err = run_main(
        capsys, "export", "--checkpoint_path", str(run / "checkpoint-2"), "--output", str(target)
    )
    assert (
        code == 2
        and err.strip()
        == f"qwen-cls: error: --output: {target} is a file; give a folder to write the model into"
    )


# 8. a trained classifier as the base of a new label set


@pytest.mark.slow
def test_a_trained_classifier_takes_a_new_label_set_with_reinit_head(tiny_model, demo_data, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "first"
    config = base_config(tiny_model, demo_data, first)
    config["training"].update(max_steps=2, save_steps=2)
    assert fit(tmp_path, config, capsys)[0] == 0
    trained = first / "checkpoint-2" / "hf_model"

    config = base_config(trained, demo_data, tmp_path / "second")
    config["training"].update(max_steps=2, save_steps=2)
    config["model"]["num_labels"] = 12
    code, _, err = fit(tmp_path, config, capsys)
    assert code == 2 and err == (
        f"qwen-cls: error: model.num_labels: 12, but the classifier in {trained} has 10 labels; set "
        "model.reinit_head: true to train a new head for the new labels on its backbone"
    )

    config["model"]["reinit_head"] = True
    code, out, _ = fit(tmp_path, config, capsys)
    assert (
        code == 0 and f"model: a new head of 12 labels on the backbone of the classifier in {trained}" in out
    )
    saved = json.loads((tmp_path / "second" / "checkpoint-2" / "hf_model" / "config.json").read_text())
    assert len(saved["id2label"]) == 12  # transformers writes num_labels as id2label

    from qwen_cls.loading import load_classifier

    old = load_file(trained / "model.safetensors")
    new = load_classifier(str(trained), 12, reinit_head=True).state_dict()
    assert new["score.weight"].shape == (12, old["score.weight"].shape[1])
    assert all(
        torch.equal(new[k], old[k]) for k in old if not k.startswith("score.")
    )  # the backbone, as trained

    config["model"].update(num_labels=10, reinit_head=False)  # the same labels: its head, said so
    config["training"]["output_dir"] = str(tmp_path / "third")
    code, out, _ = fit(tmp_path, config, capsys)
    assert code == 0
    assert f"model: the trained head of the classifier in {trained} is loaded and trained further" in out


# rough edges: library warnings, a max_steps the epochs cut short


@pytest.mark.slow
def test_a_run_says_when_epochs_cut_max_steps_short_and_leaks_no_library_warnings(
    tiny_model, demo_data, tmp_path, capsys, recwarn
):
    run = tmp_path / "run"
    config = base_config(tiny_model, demo_data, run)
    config["data"].update(
        train_jsonl=str(rows(demo_data, tmp_path / "t.jsonl", 0, 16)), min_pixels=6272, max_pixels=12544
    )
    config["training"].update(max_steps=5, save_steps=5)  # 2 steps an epoch, 1 epoch
    code, out, _ = fit(tmp_path, config, capsys)
    assert code == 0
    assert (
        "training.max_steps: 5, but training.epochs: 1 ends the run at step 2 (2 batches an epoch); raise "
        "training.epochs to train longer" in out
    )
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    leaked = [
        str(w.message) for w in recwarn if "min_pixels" in str(w.message) or "LeafSpec" in str(w.message)
    ]
    assert leaked == []
    processor = json.loads((run / "checkpoint-2" / "hf_model" / "processor_config.json").read_text())
    size = processor["image_processor"]["size"]
    assert (size["shortest_edge"], size["longest_edge"]) == (6272, 12544)  # the bounds a client gets


@pytest.mark.slow
def test_deepspeeds_cpu_fallback_line_is_kept_out(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds the GPU here: it prints no CPU fallback line to keep out")
    script = "from qwen_cls.console import quiet_library_chatter; quiet_library_chatter(); import deepspeed"
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    loud = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, cwd=tmp_path
    )
    assert "Setting accelerator to CPU" in loud.stdout + loud.stderr  # what the filter is for, on this host
    assert "Setting accelerator to CPU" not in quiet.stdout + quiet.stderr and quiet.returncode == 0


# a case of our own: a run that max_steps ended within an epoch, extended by a resume


@pytest.mark.slow
def test_extending_a_run_that_max_steps_ended_within_an_epoch_trains_both_epochs_whole(
    tiny_model, demo_data, tmp_path, capsys
):
    run = tmp_path / "run"
    config = base_config(tiny_model, demo_data, run)
    config["data"]["train_jsonl"] = str(rows(demo_data, tmp_path / "t.jsonl", 0, 64))
    config["training"].update(epochs=2, max_steps=6, save_steps=4)  # 8 steps an epoch: ends within epoch 0
    assert fit(tmp_path, config, capsys)[0] == 0
    config["training"]["max_steps"] = -1  # train on: both epochs
    assert fit(tmp_path, config, capsys, "--ckpt_path", "last")[0] == 0  # from checkpoint-6, the run's last
    infos = {p.name: json.loads((p / "training_info.json").read_text()) for p in list_checkpoints(run)}
    assert list(infos) == ["checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-12", "checkpoint-16"]
    assert (infos["checkpoint-8"]["epoch"], infos["checkpoint-16"]["epoch"]) == (0, 1)  # epoch 0 ended at 8
    assert infos["checkpoint-16"]["samples_seen"] == 16 * 8 and infos["checkpoint-16"]["final"]


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", True),
        ("/nowhere/qwen2.5-vl", False),
    ],
)
def test_a_model_that_is_not_a_folder_here_is_one_line(demo_data, tmp_path, capsys, name, hint):
    config = base_config(Path(name), demo_data, tmp_path / "run")
    code, _, err = fit(tmp_path, config, capsys)
    line = f"qwen-cls: error: model.pretrained_name: {name} is not a folder here"
    if hint:
        line += (
            "; it looks like a hub id: models are loaded from local folders only (download it first, e.g. "
            f"`hf download {name} --local-dir DIR`, and give DIR)"
        )
    assert code == 2 and err == line

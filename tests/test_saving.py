"""Checkpoints at scale: every checkpoint's weights, the resumable state in the newest only, hf_model/ in the
training precision, files written in the background."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from safetensors.torch import load_file

import qwen_cls.checkpoint as checkpoint_module
from qwen_cls.cli import main
from qwen_cls.evaluation import evaluate_all
from qwen_cls.modeling import MODEL_INPUTS, QwenVLForImageClassification
from qwen_cls.reporting import write_report
from qwen_cls.run_dir import has_state, list_checkpoints
from qwen_cls.train import run_lightning_cli
from tests.helpers import REPO, base_config, child_env, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def state_of_newest(tiny_model, demo_data, tmp_path_factory):
    """A no-evaluation run of 20 steps, a save every 5, ``keep_state_last_n: 1``."""
    tmp = tmp_path_factory.mktemp("state_of_newest")
    config = base_config(tiny_model, demo_data, tmp / "run")
    config["training"].update(max_steps=20, keep_state_last_n=1)
    path = write_config(tmp / "config.yaml", config)
    run_lightning_cli(["fit", "--config", str(path)])
    return tmp / "run", path


def test_every_checkpoint_keeps_its_weights_and_only_the_newest_its_state(
    state_of_newest, val_subset, tmp_path
):
    run, _ = state_of_newest
    layout = {p.name: sorted(c.name for c in p.iterdir()) for p in run.glob("checkpoint-*")}
    weights_only = ["hf_model", "training_info.json"]
    assert layout == {
        "checkpoint-5": weights_only,
        "checkpoint-10": weights_only,
        "checkpoint-15": weights_only,
        "checkpoint-20": ["deepspeed", *weights_only],
    }
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".qwen-cls-running.json"]
    rows = evaluate_all(str(run), eval_data=str(val_subset), output_dir=str(tmp_path), wandb=False)
    assert [r["checkpoint"] for r in rows] == [
        "checkpoint-5",
        "checkpoint-10",
        "checkpoint-15",
        "checkpoint-20",
    ]
    assert len({r["overall_loss"] for r in rows}) == 4  # each scored with its own weights
    report = write_report(str(run)).read_text()
    assert "**Finished**" in report and "checkpoint-15" in report


def test_resume_takes_the_newest_state_and_names_it_when_given_an_older_checkpoint(
    state_of_newest, tmp_path, capsys
):
    run, path = state_of_newest
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--ckpt_path", str(run / "checkpoint-10")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert f"{run / 'checkpoint-10'} keeps no resumable state" in line
    assert f"the newest that can be resumed is {run / 'checkpoint-20'}" in line

    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    cli = run_lightning_cli(
        ["fit", "--config", str(path), "--training.output_dir", str(resumed), "--training.max_steps", "25"]
        + ["--ckpt_path", "last"]
    )
    assert cli.trainer.global_step == 25
    info = json.loads((resumed / "checkpoint-25" / "training_info.json").read_text())
    assert info["samples_seen"] == 8 * 25
    assert [(p.name, has_state(p)) for p in list_checkpoints(resumed)][-2:] == [
        ("checkpoint-20", False),  # dropped once checkpoint-25 was complete
        ("checkpoint-25", True),
    ]
    assert has_state(run / "checkpoint-20"), "the run it was copied from is never touched"


def slowed(monkeypatch) -> None:
    """Every file of a save is written 0.3 s late: long enough for training to change the weights meanwhile."""
    write_hf_model, save_state = checkpoint_module.write_hf_model, TorchCheckpointIO.save_checkpoint

    def late_hf_model(*args):
        time.sleep(0.3)
        write_hf_model(*args)

    def late_state(self, *args, **kwargs):
        time.sleep(0.3)
        save_state(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_hf_model", late_hf_model)
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", late_state)


def test_background_and_synchronous_saves_write_the_same_files(tiny_model, demo_data, tmp_path, monkeypatch):
    slowed(monkeypatch)
    config = base_config(tiny_model, demo_data, tmp_path / "background")
    config["training"].update(max_steps=10, save_steps=3)
    for name, background in (("background", True), ("synchronous", False)):
        config["training"].update(output_dir=str(tmp_path / name), background_save=background)
        run_lightning_cli(["fit", "--config", str(write_config(tmp_path / f"{name}.yaml", config))])
    for step in (3, 6, 9, 10):
        a, b = (tmp_path / name / f"checkpoint-{step}" for name in ("background", "synchronous"))
        hf_a, hf_b = (load_file(p / "hf_model" / "model.safetensors") for p in (a, b))
        assert hf_a.keys() == hf_b.keys() and all(torch.equal(hf_a[k], hf_b[k]) for k in hf_a), step
        state_a, state_b = (torch.load(p / "deepspeed" / "state.ckpt", weights_only=True) for p in (a, b))
        assert state_a["global_step"] == state_b["global_step"] == step
        for key in ("state_dict", "optimizer_states"):
            flat_a, flat_b = _tensors(state_a[key]), _tensors(state_b[key])
            assert len(flat_a) == len(flat_b) > 0 and all(map(torch.equal, flat_a, flat_b)), (step, key)
        info_a, info_b = (json.loads((p / "training_info.json").read_text()) for p in (a, b))
        assert info_a["train_loss"] == info_b["train_loss"] and info_a["samples_seen"] == 8 * step
    early, late = (
        load_file(tmp_path / "background" / f"checkpoint-{s}" / "hf_model" / "model.safetensors")
        for s in (3, 10)
    )
    assert not all(torch.equal(early[k], late[k]) for k in early), "training changed the weights meanwhile"


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, list | tuple):
        return [t for item in tree for t in _tensors(item)]
    return []


def test_a_kill_while_a_background_write_is_in_flight_loses_nothing_complete(tiny_model, demo_data, tmp_path):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"].update(max_steps=20)
    path = write_config(tmp_path / "c.yaml", config)
    gate = tmp_path / "gate"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers", "fit_with_a_held_write", str(path), "10", str(gate)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "gate.held").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "gate.held").exists(), "the write of checkpoint-10 never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-5"]
    assert has_state(run / "checkpoint-5")
    assert not (run / ".checkpoint-10.tmp" / "training_info.json").exists()
    with pytest.warns(UserWarning, match="did not finish"):
        assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5"]
    cli = run_lightning_cli(["fit", "--config", str(path), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 20
    assert [p.name for p in list_checkpoints(run)] == [f"checkpoint-{s}" for s in (5, 10, 15, 20)]


def test_a_bf16_run_writes_bf16_weights_that_reload_to_the_modules_bf16_logits(
    tiny_model, demo_data, tmp_path
):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"].update(max_steps=5)
    config["trainer"]["precision"] = "bf16-mixed"
    cli = run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    hf = tmp_path / "run" / "checkpoint-5" / "hf_model"
    weights = load_file(hf / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(cli.model.net.parameters()).dtype == torch.float32  # bf16-mixed trains fp32 weights
    trained_weights = cli.model.net.state_dict()
    assert all(torch.equal(weights[k], trained_weights[k].to(torch.bfloat16)) for k in weights)

    batch = next(iter(cli.datamodule.train_dataloader()))
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    with torch.no_grad():
        trained = copy.deepcopy(cli.model.net).to(torch.bfloat16).eval()(**inputs).logits
        reloaded = QwenVLForImageClassification.from_pretrained(hf).eval()
        assert reloaded.dtype == torch.bfloat16
        # the same bf16 weights; buffers (rotary frequencies) may differ in dtype: within bf16's resolution
        torch.testing.assert_close(reloaded(**inputs).logits, trained, atol=2e-3, rtol=1.6e-2)


def test_export_copies_a_stateless_checkpoints_hf_model_in_another_dtype(state_of_newest, tmp_path, capsys):
    run, _ = state_of_newest
    main(
        [
            "export",
            "--checkpoint_path",
            str(run / "checkpoint-10"),
            "--output",
            str(tmp_path / "bf16"),
            "--dtype",
            "bfloat16",
        ]
    )
    exported = QwenVLForImageClassification.from_pretrained(tmp_path / "bf16")
    original = load_file(run / "checkpoint-10" / "hf_model" / "model.safetensors")
    assert exported.dtype == torch.bfloat16
    assert (tmp_path / "bf16" / "processor_config.json").is_file()  # the checkpoint's own processor
    weights = exported.state_dict()
    assert all(torch.equal(weights[k], original[k].to(torch.bfloat16)) for k in original)
    with pytest.raises(SystemExit):  # its own hf_model/ is there already
        main(["export", "--checkpoint_path", str(run / "checkpoint-10")])
    assert "already exists" in capsys.readouterr().err

"""Scale-out pieces that run without a GPU: data-parallel fit on CPU processes, attention choice, frozen
vision tower. (DeepSpeed needs CUDA; its checks are GPU-only.)"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwen_cls.cli import run_lightning_cli
from qwen_cls.errors import ConfigError
from qwen_cls.model import choose_attention
from tests.conftest import REPO, base_config, run_log, write_config


def test_two_process_ddp_fit_equals_one_process_with_the_same_global_batch(tiny_model, demo_data, tmp_path):
    """2 gloo processes x 4 images = 1 process x 8 images: the same rows per step (DistributedSampler splits
    the same seeded order), so the same checkpoints, losses and weights."""
    single = base_config(tiny_model, demo_data, tmp_path / "single")
    single["training"].update(max_steps=6, save_steps=3, logging_steps=1)
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "single.yaml", single))])

    ddp = base_config(tiny_model, demo_data, tmp_path / "ddp")
    ddp["training"].update(max_steps=6, save_steps=3, logging_steps=1)
    ddp["data"]["batch_size"] = 4
    ddp["trainer"].update(strategy="ddp", devices=2)
    out = subprocess.run(
        [sys.executable, "-m", "qwen_cls", "fit", "--config", str(write_config(tmp_path / "ddp.yaml", ddp))],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-"))) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    info = json.loads((run / "checkpoint-6" / "training_info.json").read_text())
    assert info["world_size"] == 2 and info["samples_seen"] == 48  # both ranks counted
    rows = {}
    for name in ("single", "ddp"):
        with run_log(tmp_path / name).open() as fh:
            rows[name] = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows["ddp"]] == list(range(1, 7))
    for a, b in zip(rows["single"], rows["ddp"], strict=True):
        assert float(b["train/loss"]) == pytest.approx(
            float(a["train/loss"]), abs=1e-5
        )  # the mean of all ranks
        assert float(b["perf/samples_per_second"]) * float(b["perf/step_time"]) == pytest.approx(8, rel=1e-3)
    w1 = load_file(tmp_path / "single" / "checkpoint-6" / "hf_model" / "model.safetensors")
    w2 = load_file(run / "checkpoint-6" / "hf_model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    # float reduction order differs; Adam turns that into ~1e-5 on near-zero-gradient biases (measured 1.1e-5)
    assert all(torch.allclose(w1[k], w2[k], atol=5e-5) for k in w1), "DDP diverged from one process"


@pytest.mark.parametrize(
    ("requested", "capability", "flash", "chosen"),
    [
        ("auto", (9, 0), True, "flash_attention_2"),  # H100 with flash-attn
        ("auto", (8, 0), True, "flash_attention_2"),  # A100
        ("auto", (7, 0), True, "sdpa"),  # V100: too old for FlashAttention-2
        ("auto", (9, 0), False, "sdpa"),  # package missing
        ("auto", None, True, "sdpa"),  # CPU
        ("sdpa", (9, 0), True, "sdpa"),
        ("eager", None, False, "eager"),
        ("flash_attention_2", (9, 0), True, "flash_attention_2"),
    ],
)
def test_attention_choice(requested, capability, flash, chosen):
    assert choose_attention(requested, capability, flash) == chosen


@pytest.mark.parametrize(
    ("requested", "message"), [("flash_attention_2", "needs the flash-attn"), ("flash", "choose")]
)
def test_attention_that_cannot_run_is_a_config_error(requested, message):
    with pytest.raises(ConfigError, match=message):
        choose_attention(requested, None, False)


def test_freeze_vision_trains_everything_but_the_vision_tower(tiny_model, demo_data, tmp_path):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["model"]["freeze_vision"] = True
    config["training"].update(max_steps=3, save_steps=3)
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])

    def by_part(weights: dict, visual: bool) -> dict:  # keyed by the name inside the part (layouts differ)
        return {
            k.split("visual.", 1)[1] if visual else k.rsplit("layers.", 1)[1]: v
            for k, v in weights.items()
            if ("visual." in k) == visual and (visual or "layers." in k)
        }

    before = load_file(tiny_model / "model.safetensors")
    after = load_file(tmp_path / "run" / "checkpoint-3" / "hf_model" / "model.safetensors")
    for visual, trained in ((True, False), (False, True)):
        old, new = by_part(before, visual), by_part(after, visual)
        assert old.keys() == new.keys() and old, visual
        changed = [k for k in old if not torch.equal(old[k], new[k])]
        assert bool(changed) is trained, visual

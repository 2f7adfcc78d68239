"""Scale-out pieces that run without a GPU: data-parallel fit on CPU processes (DDP and DeepSpeed ZeRO-2 over
gloo), attention choice, frozen vision tower. DeepSpeed's own tests are in test_deepspeed.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwen_cls.errors import ConfigError
from qwen_cls.loading import choose_attention
from qwen_cls.train import run_lightning_cli
from tests.helpers import REPO, base_config, child_env, run_log, write_config


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_and_zero2_fit_equal_one_process_with_the_same_global_batch(
    tiny_model, demo_data, tmp_path
):
    """2 gloo processes x 4 images = 1 process x 8 images: the same rows per step (DistributedSampler splits
    the same seeded order), so the same checkpoints, losses, gradient norms and weights, under DDP and under
    DeepSpeed ZeRO-2 with 2 micro-batches of 2 images. Rank 0 alone checks the rows (each once), rank 1
    uses its result (the run's own, empty row cache)."""
    single = base_config(tiny_model, demo_data, tmp_path / "single")
    single["training"].update(max_steps=6, save_steps=3, logging_steps=1)
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "single.yaml", single))])

    for strategy in ("ddp", "deepspeed_stage_2"):
        config = base_config(tiny_model, demo_data, tmp_path / strategy)
        config["training"].update(max_steps=6, save_steps=3, logging_steps=1)
        # ZeRO-2 as 2 processes x 2 micro-batches of 2 images: DeepSpeed's accumulation, scaled once
        config["data"]["batch_size"] = 4 if strategy == "ddp" else 2
        config["data"]["index_cache_dir"] = str(tmp_path / f"{strategy}-cache")
        config["trainer"].update(
            strategy=strategy, devices=2, accumulate_grad_batches=1 if strategy == "ddp" else 2
        )
        path = write_config(tmp_path / f"{strategy}.yaml", config)
        checks = tmp_path / f"{strategy}-checks"
        checks.mkdir()
        out = subprocess.run(
            [sys.executable, "-m", "tests.helpers", "fit_counting_row_checks", str(path), str(checks)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=child_env(),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(p.name for p in checks.iterdir()) == ["checks-rank0"]
        checked = (checks / "checks-rank0").read_text().splitlines()
        assert len(checked) == len(set(checked)) == 4000
        assert out.stdout.count("checked 4,000 rows of train.jsonl (header check)") == 1
    rows = {}
    for name in ("single", "ddp", "deepspeed_stage_2"):
        with run_log(tmp_path / name).open() as fh:
            rows[name] = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    w1 = load_file(tmp_path / "single" / "checkpoint-6" / "hf_model" / "model.safetensors")
    for strategy in ("ddp", "deepspeed_stage_2"):
        run = tmp_path / strategy
        assert sorted(
            p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-"))
        ) == [
            "checkpoint-3",
            "checkpoint-6",
        ]
        info = json.loads((run / "checkpoint-6" / "training_info.json").read_text())
        assert info["world_size"] == 2 and info["samples_seen"] == 48  # both ranks counted
        assert [int(r["step"]) for r in rows[strategy]] == list(range(1, 7))
        for a, b in zip(rows["single"], rows[strategy], strict=True):
            # the mean of all ranks; measured: at most 2.4e-7 apart (DDP and ZeRO-2 alike) on these 6 steps
            assert float(b["train/loss"]) == pytest.approx(float(a["train/loss"]), abs=1e-5), strategy
            # the gradient itself (Adam's update would hide a wrong scale); measured: 1.5e-7 relative
            assert float(b["train/grad_norm"]) == pytest.approx(float(a["train/grad_norm"]), rel=1e-4), (
                strategy
            )
            assert float(b["perf/samples_per_second"]) * float(b["perf/step_time"]) == pytest.approx(
                8, rel=1e-3
            )
        w2 = load_file(run / "checkpoint-6" / "hf_model" / "model.safetensors")
        assert w1.keys() == w2.keys()
        # float reduction order differs; Adam turns that into ~1e-5 on near-zero-gradient biases (measured 1.1e-5)
        assert all(torch.allclose(w1[k], w2[k], atol=5e-5) for k in w1), (
            f"{strategy} diverged from one process"
        )


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


def test_attention_that_cannot_run_is_a_config_error():
    """(A name that is no choice at all is refused at parse time: tests/test_cli.py.)"""
    with pytest.raises(
        ConfigError, match="model.attn_implementation: flash_attention_2 needs the flash-attn"
    ):
        choose_attention("flash_attention_2", None, False)


@pytest.mark.slow
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

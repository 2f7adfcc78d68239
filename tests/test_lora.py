"""LoRA (peft): learns, trains only adapters and the head, writes merged weights plus peft's adapter, resumes
exactly, equals one process under DDP and ZeRO-2, and refuses bad settings in one line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from qwen_cls.cli import main
from qwen_cls.evaluation import evaluate
from qwen_cls.export import export
from qwen_cls.loading import load_classifier
from qwen_cls.rows import read_rows
from qwen_cls.train import run_lightning_cli
from tests.helpers import REPO, base_config, child_env, losses_by_step, run_log, write_config

LORA = {"enabled": True, "r": 8, "alpha": 16.0, "dropout": 0.0}


def lora_config(tiny_model, demo_data, run: Path, **training) -> dict:
    config = base_config(tiny_model, demo_data, run)
    config["model"]["lora"] = dict(LORA)
    config["training"].update(training)
    return config


def a_batch(cli, demo_data, n: int = 8) -> dict[str, torch.Tensor]:
    from qwen_cls.data import ImageRowsDataset

    rows = ImageRowsDataset(read_rows(demo_data / "val.jsonl", cli.datamodule.dataset_configs))
    return cli.datamodule.collator()([rows[i] for i in range(n)])


@pytest.fixture(scope="module")
def lora_run(tiny_model, demo_data, tmp_path_factory):
    """One epoch (125 steps of 32 images), LoRA r=8 on the language model, adapters saved too."""
    tmp = tmp_path_factory.mktemp("lora")
    config = lora_config(
        tiny_model,
        demo_data,
        tmp / "run",
        epochs=1,
        max_steps=-1,
        save_steps=1000,
        lr=3e-3,
        warmup_steps=0.05,
        save_adapter=True,
    )
    config["data"]["batch_size"] = 32
    return run_lightning_cli(["fit", "--config", str(write_config(tmp / "c.yaml", config))]), tmp / "run"


@pytest.mark.slow
def test_lora_learns_mnist_far_above_chance(lora_run, demo_data, tmp_path):
    _, run = lora_run
    metrics = evaluate(str(run), str(demo_data / "val.jsonl"), output=str(tmp_path / "m.json"))
    assert Path(metrics["checkpoint"]).name == "checkpoint-125"
    assert metrics["overall_accuracy"] >= 0.5  # chance: 0.1; measured 0.67


@pytest.mark.slow
def test_only_adapters_and_the_head_trained(lora_run, tiny_model):
    cli, _ = lora_run
    net = cli.model.net
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("score.") for n in trained)
    assert sum(".lora_A." in n for n in trained) == 14  # 7 projections x the tiny model's 2 layers
    # the frozen base, in memory, before any merge: bit-identical to what was loaded
    base = load_classifier(str(tiny_model), 10).state_dict()
    for name, value in net.state_dict().items():
        plain = name.replace(".base_layer.", ".")
        if ".lora_" in name or "score." in name:
            continue
        assert torch.equal(value, base[plain]), name


@pytest.mark.slow
def test_merged_hf_model_and_the_adapter_reproduce_the_trained_module(lora_run, tiny_model, demo_data):
    from peft import PeftModel

    cli, run = lora_run
    checkpoint = run / "checkpoint-125"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter",
        "deepspeed",
        "hf_model",
        "training_info.json",
    ]
    batch = a_batch(cli, demo_data)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "dataset_idx", "skipped_images")}
    with torch.no_grad():
        trained = cli.model.eval()(batch)
        merged = AutoModelForImageClassification.from_pretrained(checkpoint / "hf_model").eval()
        assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
        assert torch.allclose(merged(**inputs).logits, trained, atol=1e-5)
        base = load_classifier(str(tiny_model), 10)
        adapted = PeftModel.from_pretrained(base, checkpoint / "adapter").eval()
        assert torch.allclose(adapted(**inputs).logits, trained, atol=1e-5)


@pytest.mark.slow
def test_the_resumable_state_holds_only_what_trains(lora_run):
    cli, run = lora_run
    state = torch.load(
        run / "checkpoint-125" / "deepspeed" / "state.ckpt", weights_only=True, map_location="cpu"
    )
    assert set(state["state_dict"]) == cli.model.trainable_state_names()


@pytest.mark.slow
def test_lora_resumes_exactly(tiny_model, demo_data, tmp_path):
    config = lora_config(
        tiny_model, demo_data, tmp_path / "straight", max_steps=8, save_steps=4, logging_steps=1
    )
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "straight.yaml", config))])
    resumed = tmp_path / "resumed"  # a run killed after checkpoint-4
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", resumed / "checkpoint-4")
    config["training"]["output_dir"] = str(resumed)
    run_lightning_cli(
        ["fit", "--config", str(write_config(tmp_path / "r.yaml", config)), "--ckpt_path", "last"]
    )
    straight, again = losses_by_step(tmp_path / "straight"), losses_by_step(resumed)
    for step in range(5, 9):
        assert again[step] == pytest.approx(straight[step], abs=1e-6), step
    a = load_file(tmp_path / "straight" / "checkpoint-8" / "hf_model" / "model.safetensors")
    b = load_file(resumed / "checkpoint-8" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_and_zero2_equal_one_process(tiny_model, demo_data, tmp_path):
    """2 gloo processes x 4 images = 1 process x 8: the same losses, and the same merged hf_model/ (ZeRO-2:
    2 processes x 2 micro-batches of 2)."""
    single = lora_config(
        tiny_model, demo_data, tmp_path / "single", max_steps=4, save_steps=4, logging_steps=1
    )
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "single.yaml", single))])
    reference = load_file(tmp_path / "single" / "checkpoint-4" / "hf_model" / "model.safetensors")
    for strategy in ("ddp", "deepspeed_stage_2"):
        config = lora_config(
            tiny_model, demo_data, tmp_path / strategy, max_steps=4, save_steps=4, logging_steps=1
        )
        config["data"]["batch_size"] = 4 if strategy == "ddp" else 2
        config["trainer"].update(
            strategy=strategy, devices=2, accumulate_grad_batches=1 if strategy == "ddp" else 2
        )
        path = write_config(tmp_path / f"{strategy}.yaml", config)
        out = subprocess.run(
            [sys.executable, "-m", "qwen_cls", "fit", "--config", str(path)],
            cwd=REPO, capture_output=True, text=True, env=child_env(),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        with run_log(tmp_path / "single").open() as a, run_log(tmp_path / strategy).open() as b:
            ours = [float(r["train/loss"]) for r in csv.DictReader(a) if r.get("train/loss")]
            theirs = [float(r["train/loss"]) for r in csv.DictReader(b) if r.get("train/loss")]
        assert theirs == pytest.approx(ours, abs=1e-5), strategy
        weights = load_file(tmp_path / strategy / "checkpoint-4" / "hf_model" / "model.safetensors")
        assert weights.keys() == reference.keys(), strategy  # merged: the plain model's names
        assert all(torch.allclose(weights[k], reference[k], atol=5e-5) for k in weights), strategy
        info = json.loads((tmp_path / strategy / "checkpoint-4" / "training_info.json").read_text())
        assert info["world_size"] == 2
    # export of a LoRA checkpoint whose deepspeed/ holds only adapters and head: a copy of the merged model
    exported = export(str(tmp_path / strategy / "checkpoint-4"), output=str(tmp_path / "exported"))
    again = load_file(exported / "model.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)


@pytest.mark.parametrize(
    "lora,line",
    [
        ({"r": 0}, "model.lora.r: must be >= 1, got 0"),
        ({"dropout": 1.0}, "model.lora.dropout: must be in [0, 1), got 1.0"),
        ({"target_modules": ["no_such_proj"]}, "model.lora.target_modules: ['no_such_proj']"),
    ],
)
@pytest.mark.slow
def test_bad_lora_settings_stop_before_step_1_in_one_line(
    tiny_model, demo_data, tmp_path, capsys, lora, line
):
    config = lora_config(tiny_model, demo_data, tmp_path / "run")
    config["model"]["lora"].update(lora)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith(f"qwen-cls: error: {line}"), err[-1]
    assert not list((tmp_path / "run").glob("checkpoint-*")) if (tmp_path / "run").exists() else True


def test_merging_is_w_plus_scaled_b_a_under_the_plain_names():
    from qwen_cls.lora import adapter_items, merged_items

    w, a, b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    state = {
        "m.q_proj.base_layer.weight": w,
        "m.q_proj.base_layer.bias": torch.ones(4),
        "m.q_proj.lora_A.default.weight": a,
        "m.q_proj.lora_B.default.weight": b,
        "score.weight": torch.ones(2, 4),
        "norm.weight": torch.full((4,), 2.0),
    }
    merged = dict(merged_items(state, 0.5))
    assert sorted(merged) == ["m.q_proj.bias", "m.q_proj.weight", "norm.weight", "score.weight"]
    assert torch.allclose(merged["m.q_proj.weight"], w + 0.5 * b @ a)
    assert torch.equal(merged["score.weight"], torch.ones(2, 4))
    assert sorted(dict(adapter_items(state, ["score"]))) == [
        "base_model.model.m.q_proj.lora_A.weight",
        "base_model.model.m.q_proj.lora_B.weight",
        "base_model.model.score.weight",
    ]


def test_default_targets_are_the_language_models_projections_only():
    import re

    from qwen_cls.config import LoraSettings
    from qwen_cls.lora import target_modules

    pattern = target_modules(LoraSettings(enabled=True))
    assert re.fullmatch(pattern, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.language_model.layers.0.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.visual.blocks.0.mlp.down_proj")  # same name in the vision tower
    with_vision = target_modules(LoraSettings(enabled=True, vision=True))
    assert re.fullmatch(with_vision, "model.visual.blocks.0.attn.qkv")
    assert not re.fullmatch(with_vision, "model.visual.merger.mlp.0")


def test_flops_and_checkpoint_bytes_count_what_trains(tiny_model):
    """Training FLOPs per forward FLOP (language model, vision tower): 3 where weights train, 2 where only
    activations need gradients (LoRA), 1 where nothing trains at or before a part; the state holds what trains."""
    from qwen_cls.config import LoraSettings
    from qwen_cls.flops import pass_factors
    from qwen_cls.lora import apply_lora
    from qwen_cls.saving import checkpoint_bytes

    net = load_classifier(str(tiny_model), 10)
    full_hf, full_state = checkpoint_bytes(net)
    assert pass_factors(net) == (3, 3)
    net.model.visual.requires_grad_(False)
    assert pass_factors(net) == (3, 1)
    apply_lora(net, LoraSettings(enabled=True, r=4))
    assert pass_factors(net) == (2, 1)
    hf, state = checkpoint_bytes(net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert hf == full_hf  # merged: the plain model's weights
    assert state == trainable * (4 + 8) < full_state / 10
    vision = load_classifier(str(tiny_model), 10)
    apply_lora(vision, LoraSettings(enabled=True, r=4, vision=True))
    assert pass_factors(vision) == (2, 2)

"""The Qwen-VL family as backbone: each family's tiny model loads as its own classifier, is counted honestly
(FLOPs equal torch's counter; an MoE counts the experts a token runs), gets LoRA on its own projections, learns
the demo data, reloads from ``hf_model/`` with the module's logits, resumes exactly; Qwen3-VL under ZeRO-3 on two
processes (DeepStack's mergers gathered whole) and with LoRA. Qwen2.5-VL is the rest of the suite's model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageClassification, AutoProcessor

from qwen_cls.config import LoraSettings
from qwen_cls.data import chat_prompt
from qwen_cls.evaluation import evaluate
from qwen_cls.families import DEFAULT_FAMILY, FAMILIES
from qwen_cls.flops import forward_flops, text_flops
from qwen_cls.loading import load_classifier
from qwen_cls.lora import adapted, apply_lora
from qwen_cls.modeling import MODEL_INPUTS, QwenVLForImageClassification, classifier_class
from qwen_cls.train import run_lightning_cli
from tests.helpers import base_config, run_main, write_config
from tests.test_deepspeed import assert_same_weights, ds_config, fit_with_logits, hf_logits

OTHER_FAMILIES = [f for f in FAMILIES if f != DEFAULT_FAMILY]
# steps of 32 images after which each family's tiny model is far above chance (measured on the 200 rows: Qwen3-VL
# 0.82, its MoE 0.75, Qwen3.5 0.66 after 100; Qwen2-VL's learns slower: 0.37 after 100, 0.57 after 125)
STEPS = {"qwen2_vl": 200}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_familys_tiny_model_loads_as_its_own_classifier(family, tiny_of, tmp_path):
    folder = tiny_of(family)
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    model = load_classifier(str(folder), 10)
    assert type(model) is classifier_class(family) and isinstance(model, QwenVLForImageClassification)
    model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == f"{family}_classifier"  # hf_model/ records which backbone it holds
    again = QwenVLForImageClassification.from_pretrained(tmp_path / "hf")
    assert (
        type(again) is type(model) is type(AutoModelForImageClassification.from_pretrained(tmp_path / "hf"))
    )
    assert not [k for k in again.state_dict() if "lm_head" in k]  # the vocabulary projection is dropped


def test_make_tiny_takes_the_family(tmp_path, capsys):
    code, _, err = run_main(capsys, "make-tiny", str(tmp_path / "q3"), "--family", "qwen3_vl")
    assert code == 0, err
    config = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert (config["model_type"], config["vision_config"]["patch_size"]) == ("qwen3_vl", 16)
    assert config["vision_config"]["deepstack_visual_indexes"] == [0]
    code, _, err = run_main(capsys, "make-tiny", str(tmp_path / "x"), "--family", "llava")
    assert code == 2 and "family" in err and "qwen3_vl_moe" in err
    assert not (tmp_path / "x").exists()


def _wide_batch(folder: Path) -> dict:
    """Two 12x20-patch images (several windows for Qwen2.5-VL, a long full-attention row for the others)."""
    processor = AutoProcessor.from_pretrained(folder)
    prompt = chat_prompt(processor, "Which {dataset} class is this image?", "mnist", "")
    patch = processor.image_processor.patch_size
    pixels = 12 * patch * 20 * patch
    images = [Image.new("RGB", (280, 168), (30, 60, 90)), Image.new("RGB", (280, 168), (200, 10, 10))]
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    return processor(text=[prompt, prompt], images=images, size=size, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flops_agree_with_torch_flop_counter(family, tiny_of):
    """The analytical count (what MFU divides) against torch's count of the real forward pass: eager attention
    and eager experts, so every matmul is one torch sees (grouped expert matmuls are invisible to it)."""
    batch = _wide_batch(tiny_of(family))
    assert batch["image_grid_thw"].tolist() == [[1, 12, 20]] * 2
    model = load_classifier(str(tiny_of(family)), 10, torch.float32, "eager")
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_experts_implementation"):
            module.config._experts_implementation = "eager"
    estimate = float(forward_flops(model.config, batch["attention_mask"].sum(-1), batch["image_grid_thw"]))
    with FlopCounterMode(display=False) as counted:
        model(**batch)
    # every family agrees to 1e-4 (Qwen3.5: the short convolution's K-1 padded outputs torch counts, we do not)
    assert estimate == pytest.approx(counted.get_total_flops(), rel=1e-4)


def test_moe_flops_count_the_experts_each_token_runs_not_all_of_them():
    h, moe, dense, experts, k = 8, 4, 16, 64, 2
    tc = SimpleNamespace(
        hidden_size=h, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        intermediate_size=dense, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=moe,
        decoder_sparse_step=1, mlp_only_layers=[0],
    )  # fmt: skip
    attention = 2 * (8 * 8 * 2 + 8 * 4 * 2)  # per token and layer: q, o 8x8; k, v 8x4
    dense_mlp = 2 * 3 * h * dense  # layer 0 is mlp_only
    routed = 2 * (h * experts + k * 3 * h * moe)  # layer 1: the router, then 2 of the 64 experts
    lengths = torch.tensor([3, 5])
    squares = 2 * 4 * 8 * (9 + 25)
    assert float(text_flops(tc, lengths)) == 8 * (2 * attention + dense_mlp + routed) + squares
    every_expert = 2 * (h * experts + experts * 3 * h * moe)
    assert every_expert > 9 * routed  # what a count of the weights (total, not active parameters) would add


LORA_TARGETS = {
    "qwen2_vl": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1", "fc2"},
    "qwen2_5_vl": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj"},
    "qwen3_vl": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "linear_fc1", "linear_fc2"},
    # fused experts are no nn.Linear: attention only in the language model
    "qwen3_vl_moe": {"q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj", "linear_fc1", "linear_fc2"},
    "qwen3_5": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "linear_fc1", "linear_fc2"},
    # its shared expert is a plain MLP (gate, up, down); the routed experts are fused
    "qwen3_5_moe": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "linear_fc1", "linear_fc2"},
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_adapts_each_familys_own_projections(family, tiny_of):
    net = load_classifier(str(tiny_of(family)), 10)
    apply_lora(net, LoraSettings(enabled=True, vision=True))
    names = [name for name, _ in adapted(net)]
    assert {name.rsplit(".", 1)[-1] for name in names} == LORA_TARGETS[family]
    assert not [n for n in names if ".experts." in n]
    assert not [
        n for n in names if ".merger." in n or "deepstack" in n
    ]  # mergers train only via modules_to_save
    assert all(
        ".lora_" in n or n.startswith("score.") or not p.requires_grad for n, p in net.named_parameters()
    )


@pytest.fixture(scope="module", params=OTHER_FAMILIES)
def family_run(request, tiny_of, demo_data, tmp_path_factory):
    """One run per family: STEPS of 32 images (100 by default), a checkpoint halfway and at the end (both
    resumable)."""
    family = request.param
    steps = STEPS.get(family, 100)
    tmp = tmp_path_factory.mktemp(f"run-{family}")
    config = base_config(tiny_of(family), demo_data, tmp / "run")
    path = write_config(
        tmp / "c.yaml",
        config,
        data={"batch_size": 32},
        training={
            "epochs": 2,
            "max_steps": steps,
            "save_steps": steps // 2,
            "lr": 3e-3,
            "warmup_steps": 0.05,
            "logging_steps": 10,
        },
    )
    cli = run_lightning_cli(["fit", "--config", str(path)])
    return SimpleNamespace(family=family, steps=steps, cli=cli, run=tmp / "run", path=path)


@pytest.mark.slow
def test_each_family_learns_and_its_hf_model_gives_the_modules_logits(family_run, val_subset, tmp_path):
    run, steps = family_run.run, family_run.steps
    assert {p.name for p in run.glob("checkpoint-*")} == {f"checkpoint-{steps // 2}", f"checkpoint-{steps}"}
    hf_dir = run / f"checkpoint-{steps}" / "hf_model"
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == f"{family_run.family}_classifier"
    metrics = evaluate(str(run), str(val_subset), output=str(tmp_path / "m.json"))
    assert metrics["overall_samples"] == 200
    assert metrics["overall_accuracy"] >= 0.5, metrics  # chance: 0.1
    module = family_run.cli.model.eval()
    batch = next(iter(family_run.cli.datamodule.train_dataloader()))
    with torch.no_grad():
        trained = module(batch)
        reloaded = QwenVLForImageClassification.from_pretrained(hf_dir).eval()
        logits = reloaded(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
    assert (trained - logits).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_each_familys_vllm_export_names_its_architecture(family_run, tmp_path, capsys):
    """The folder vLLM loads: the family's ``*ForSequenceClassification`` and base model type, the head under
    the name the family's vLLM model loads it by; Qwen3.5, which vLLM 0.32 does not serve with its vision
    tower, refused in one line with nothing written (vLLM run for real: Qwen2.5-VL in tests/test_serving.py,
    Qwen3-VL and its MoE below)."""
    checkpoint = family_run.run / f"checkpoint-{family_run.steps}"
    target = ["--format", "vllm", "--output", str(tmp_path / "v")]
    code, _, err = run_main(capsys, "export", "--checkpoint_path", str(checkpoint), *target)
    family = FAMILIES[family_run.family]
    if not family.vllm_serves:
        assert code == 2 and "does not serve Qwen3.5" in err.strip().splitlines()[-1]
        assert not (tmp_path / "v").exists()
        return
    assert code == 0, err[-2000:]
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == ([family.vllm_architecture], family.model_type)
    weights = load_file(tmp_path / "v" / "model.safetensors")
    ours = load_file(checkpoint / "hf_model" / "model.safetensors")
    assert weights[family.vllm_head].equal(ours["score.weight"])
    assert len(weights) == len(ours)


@pytest.mark.slow
def test_each_family_resumes_exactly(family_run, tmp_path):
    resumed = tmp_path / "run"
    shutil.copytree(family_run.run, resumed)
    last = f"checkpoint-{family_run.steps}"
    shutil.rmtree(resumed / last)
    cli = run_lightning_cli(
        [
            "fit",
            "--config",
            str(family_run.path),
            "--training.output_dir",
            str(resumed),
            "--ckpt_path",
            "last",
        ]
    )
    assert cli.trainer.global_step == family_run.steps
    assert_same_weights(family_run.run / last / "hf_model", resumed / last / "hf_model", 0.0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_qwen3_vl_under_zero3_on_two_processes_gathers_deepstack_whole(
    tiny_of, demo_data, val_subset, tmp_path, capsys
):
    folder = tiny_of("qwen3_vl")
    config = ds_config(folder, demo_data, tmp_path / "run", 3)
    saved = fit_with_logits(config, tmp_path / "run.yaml", val_subset)
    hf_dir = tmp_path / "run" / "checkpoint-6" / "hf_model"
    weights = load_file(hf_dir / "model.safetensors")
    whole = load_classifier(str(folder), 10).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in whole.items()}
    assert any("deepstack_merger_list" in k for k in weights)
    assert torch.allclose(hf_logits(hf_dir, saved["batch"]), saved["logits"], atol=1e-5)
    code, _, err = run_main(
        capsys, "export", "--checkpoint_path", str(hf_dir.parent), "--output", str(tmp_path / "exp")
    )
    assert code == 0, err[-3000:]
    assert_same_weights(hf_dir, tmp_path / "exp", atol=0.0)


@pytest.mark.slow
def test_lora_on_qwen3_vl_merges_into_hf_model_and_writes_peft_adapter(tiny_of, demo_data, tmp_path):
    from peft import PeftModel

    folder = tiny_of("qwen3_vl")
    config = base_config(folder, demo_data, tmp_path / "run")
    config["model"]["lora"] = {"enabled": True, "r": 8, "alpha": 16.0, "vision": True}
    path = write_config(tmp_path / "c.yaml", config, training={"save_adapter": True, "lr": 3e-3})
    cli = run_lightning_cli(["fit", "--config", str(path)])
    checkpoint = tmp_path / "run" / "checkpoint-12"
    batch = next(iter(cli.datamodule.train_dataloader()))
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with torch.no_grad():
        trained = cli.model.eval()(batch)
        merged = QwenVLForImageClassification.from_pretrained(checkpoint / "hf_model").eval()
        assert not any(".lora_" in k for k in merged.state_dict())
        assert torch.allclose(merged(**inputs).logits, trained, atol=1e-5)
        adapter = PeftModel.from_pretrained(load_classifier(str(folder), 10), checkpoint / "adapter").eval()
        assert torch.allclose(adapter(**inputs).logits, trained, atol=1e-5)
    assert (merged(**inputs).logits - load_classifier(str(folder), 10)(**inputs).logits).abs().max() > 1e-3


def test_an_moe_export_for_vllm_stores_the_experts_in_the_released_layout(tmp_path):
    """transformers keeps fused experts as (experts, out, in); vLLM reads the released checkpoints' (experts,
    in, out). The export swaps the two axes of those tensors only, renames the head as the family needs, and
    keeps every offset."""
    from safetensors.torch import save_file

    from qwen_cls.serving import rewrite_tensors

    gate_up = torch.arange(2 * 6 * 4, dtype=torch.bfloat16).view(2, 6, 4)
    down = torch.randn(2, 4, 3)
    tensors = {
        "model.language_model.layers.0.mlp.experts.gate_up_proj": gate_up,
        "model.language_model.layers.0.mlp.experts.down_proj": down,
        "model.language_model.layers.0.mlp.gate.weight": torch.randn(2, 4),
        "score.weight": torch.randn(10, 4),
    }
    save_file(tensors, tmp_path / "in.safetensors")
    transposed = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    assert rewrite_tensors(
        tmp_path / "in.safetensors",
        tmp_path / "out.safetensors",
        {"score.weight": "score.weight"},
        transposed,
    )
    out = load_file(tmp_path / "out.safetensors")
    assert out.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor.transpose(1, 2) if name.endswith(transposed) else tensor
        assert out[name].dtype == tensor.dtype and out[name].equal(expected), name


def test_a_qwen3_5_export_for_vllm_is_refused_in_one_line():
    from qwen_cls.errors import ConfigError
    from qwen_cls.serving import vllm_config

    with pytest.raises(ConfigError, match="vLLM 0.32 does not serve Qwen3.5 as an image classifier"):
        vllm_config({"model_type": "qwen3_5_classifier", "id2label": {"0": "a"}})


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_vllm_serves_qwen3_vl_and_its_moe_with_the_probabilities_of_predict(family, demo_data, tmp_path):
    """vLLM's CPU build on the export of a Qwen3-VL (the head at the top level) and of its MoE (routed experts
    transposed, top-k renormalised), head size 64: the probabilities `qwen-cls predict` gives."""
    import subprocess

    import qwen_cls
    from qwen_cls.commands import export
    from qwen_cls.tiny import make_tiny
    from tests.helpers import REPO
    from tests.test_serving import images_of_two_sizes, predicted, vllm_env, vllm_python

    python = vllm_python()
    model = make_tiny(tmp_path / "tiny64", hidden_size=128, head_dim=64, family=family)
    config = base_config(model, demo_data, tmp_path / "run")
    config["training"].update(max_steps=30, save_steps=30)
    qwen_cls.fit(config)
    checkpoint = tmp_path / "run" / "checkpoint-30"
    served = export(str(checkpoint), str(tmp_path / "vllm"), format="vllm")
    images = images_of_two_sizes(demo_data, tmp_path / "images")
    out = subprocess.run(
        [str(python), str(REPO / "scripts" / "vllm_classify.py"), str(served), *map(str, images),
         "--enforce_eager", "--max_model_len", "512", "--dtype", "float32"],
        capture_output=True, text=True, env=vllm_env(), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    vllm = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ours = predicted(checkpoint, images)
    assert len(vllm) == len(ours) == 8
    for theirs, mine in zip(vllm, ours, strict=True):
        assert max(abs(a - b) for a, b in zip(theirs["probabilities"], mine["by_index"], strict=True)) < 1e-4
        assert theirs["index"] == mine["indices"][0]

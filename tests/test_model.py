"""The classifier: pooling under both paddings, loading paths, losses, the tiny model's round trip."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, AutoProcessor

from qwen_cls.config import TrainingConfig
from qwen_cls.data import chat_prompt
from qwen_cls.errors import ConfigError
from qwen_cls.loading import load_classifier
from qwen_cls.model import QwenClassifier
from qwen_cls.modeling import QwenVLForImageClassification, pool_last_token


def test_pool_last_token_picks_the_last_attended_position():
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool_last_token(hidden, right).flatten().tolist() == [2.0, 9.0]
    assert pool_last_token(hidden, left).flatten().tolist() == [4.0, 9.0]


def _batch(processor, padding_side: str):
    processor.tokenizer.padding_side = padding_side
    short = chat_prompt(processor, "Which {dataset} class is this image?", "mnist", "")
    long = chat_prompt(
        processor, "What is shown in this image? Classify it: {description}.", "mnist", "digits"
    )
    images = [Image.new("RGB", (28, 28), (30, 60, 90)), Image.new("RGB", (28, 28), (200, 10, 10))]
    return processor(text=[short, long], images=images, padding=True, return_tensors="pt")


def test_logits_equal_under_left_and_right_padding(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    model = load_classifier(str(tiny_model), num_labels=10).eval()
    right, left = _batch(processor, "right"), _batch(processor, "left")
    assert (right["attention_mask"][0] == 0).any(), (
        "the short prompt must be padded for this test to mean anything"
    )
    assert right["attention_mask"][0, -1] == 0 and left["attention_mask"][0, 0] == 0
    with torch.no_grad():
        logits_right = model(**right).logits
        logits_left = model(**left).logits
    torch.testing.assert_close(logits_right, logits_left, atol=1e-5, rtol=1e-4)
    # and the pooled row really depends on its own sample (not a padding position)
    assert not torch.allclose(logits_right[0], logits_right[1])


def test_backbone_is_loaded_without_lm_head_and_round_trips(tiny_model, tmp_path):
    model = load_classifier(str(tiny_model), num_labels=7)
    names = {n for n, _ in model.named_parameters()}
    assert not any("lm_head" in n for n in names)
    assert "score.weight" in names and "score.bias" not in names  # a bias-free head by default (servable)
    model.save_pretrained(tmp_path / "hf")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    assert isinstance(again, QwenVLForImageClassification)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert again.config.id2label[3] == "3"


def test_loading_a_saved_classifier_checks_num_labels(tiny_model, tmp_path):
    load_classifier(str(tiny_model), num_labels=7).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="model.num_labels"):
        load_classifier(str(tmp_path / "hf"), num_labels=10)


def test_a_folder_of_an_unsupported_family_is_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    supported = (
        r"holds a 'llama' model; qwen-cls fine-tunes Qwen2-VL \(qwen2_vl\), Qwen2.5-VL \(qwen2_5_vl\), "
    )
    with pytest.raises(
        ConfigError, match=supported + r"Qwen3-VL \(qwen3_vl\), Qwen3-VL-MoE \(qwen3_vl_moe\), Qwen3.5"
    ):
        load_classifier(str(tmp_path), 10)
    with pytest.raises(ConfigError, match="nowhere is not a folder here$"):
        load_classifier(str(tmp_path / "nowhere"), 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_classifier(str(tmp_path / "empty"), 10)


def test_num_labels_must_cover_every_dataset():
    from qwen_cls.config import DatasetConfig, DatasetsConfig

    with pytest.raises(ConfigError, match="datasets.dataset_configs.food2k.num_classes"):
        QwenClassifier(
            "x", num_labels=101, datasets=DatasetsConfig({"food2k": DatasetConfig(num_classes=2000)})
        )


def test_tiny_processor_reloads_identically(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    again = AutoProcessor.from_pretrained(tiny_model)
    a, b = _batch(processor, "right"), _batch(again, "right")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]  # 56x56 -> 4x4 patches -> 4 visual tokens


def test_gradient_checkpointing_option_gives_the_same_gradients(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    batch = _batch(processor, "right")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same new head both times
        module = QwenClassifier(
            str(tiny_model), num_labels=10, training=TrainingConfig(gradient_checkpointing=checkpointing)
        )
        module.configure_model()
        assert module.net.is_gradient_checkpointing is checkpointing
        loss = module.net(**batch).logits.square().mean()
        loss.backward()
        grads.append(module.net.model.visual.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


SERVE = """
import json, sys
before = set(sys.modules)
{imports}
model = {model_class}.from_pretrained(sys.argv[1])
print(json.dumps({{"class": type(model).__name__, "modules": sorted(set(sys.modules) - before)}}))
"""


@pytest.mark.slow
def test_the_trained_model_loads_without_the_trainer(tiny_model, tmp_path):
    """A fresh interpreter that imports ``qwen_cls.modeling`` and loads an ``hf_model/`` with transformers'
    Auto class imports nothing of ours beyond ``qwen_cls.modeling`` and the config constants it takes (standard
    library only), and nothing transformers' own loading of a Qwen2.5-VL would not: no Lightning, matplotlib,
    W&B (psutil is transformers' own import, not ours)."""
    import json
    import subprocess
    import sys

    from transformers import AutoConfig

    from qwen_cls.modeling import classifier_config

    hf_model = tmp_path / "hf_model"
    QwenVLForImageClassification(
        classifier_config(AutoConfig.from_pretrained(tiny_model), 10)
    ).save_pretrained(hf_model)

    def loaded(imports: str, model_class: str, folder) -> dict:
        script = SERVE.format(imports=imports, model_class=model_class)
        out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    auto = "import qwen_cls.modeling\nfrom transformers import AutoModelForImageClassification"
    ours = loaded(auto, "AutoModelForImageClassification", hf_model)
    assert (
        ours["class"] == "Qwen2_5_VLForImageClassification"
    )  # the family's class, a QwenVLForImageClassification
    plain = loaded("from transformers import Qwen2_5_VLModel", "Qwen2_5_VLModel", tiny_model)  # the backbone
    extra = set(ours["modules"]) - set(plain["modules"])
    ours_only = {
        m for m in extra if not m.startswith("transformers.")
    }  # and the other families' transformers classes
    assert ours_only == {
        "qwen_cls",
        "qwen_cls.modeling",
        "qwen_cls.config",
        "qwen_cls.errors",
        "qwen_cls.families",
    }
    assert not [m for m in extra if m.split(".")[0] in ("lightning", "matplotlib", "wandb", "deepspeed")]
    assert not {"lightning", "matplotlib", "wandb", "torchmetrics"} & {
        m.split(".")[0] for m in ours["modules"]
    }

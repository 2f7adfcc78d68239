"""Serving what was trained: class names end to end, `qwen-cls export --format vllm`, and vLLM itself (CPU build,
its own environment `.venv-vllm` from `make serve-env`) giving the probabilities `qwen-cls predict` gives."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import qwen_cls
from qwen_cls.commands import export as export_model
from qwen_cls.config import DatasetConfig, DatasetsConfig
from qwen_cls.errors import ConfigError
from qwen_cls.predict import Predictor
from qwen_cls.tiny import make_tiny
from tests.helpers import REPO, base_config, run_main, write_config

VLLM_PYTHON = Path(os.environ.get("QWEN_CLS_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def vllm_python() -> Path:
    """vLLM's interpreter; in CI a missing serve environment fails the run, elsewhere these tests skip."""
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    if os.environ.get("CI"):
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: `make test` builds it (make serve-env)")
    pytest.skip(f"vLLM: no {VLLM_PYTHON} here; `make serve-env` builds it")


def vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    return {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


# class names, checked before training


@pytest.mark.parametrize(
    "names,line",
    [
        (NAMES[:9], "datasets.dataset_configs.mnist.class_names: 9 names for num_classes 10"),
        (NAMES[:9] + ["zero"], "datasets.dataset_configs.mnist.class_names: 'zero' names labels 0 and 9"),
        (NAMES[:9] + [" "], "datasets.dataset_configs.mnist.class_names: the name of label 9 is empty"),
    ],
)
def test_class_names_of_the_wrong_length_repeated_or_empty_are_one_line(names, line):
    with pytest.raises(ConfigError) as error:
        DatasetsConfig({"mnist": DatasetConfig(10, class_names=names)})
    assert str(error.value) == line


def test_class_names_from_a_file_and_the_head_columns_they_name(tmp_path):
    listed = tmp_path / "names.txt"
    listed.write_text(
        "\ufeff" + "\n".join(NAMES) + "\n\n", encoding="utf-8"
    )  # a BOM and blank lines at the end
    one = DatasetsConfig({"mnist": DatasetConfig(10, class_names=str(listed))})
    assert one.dataset_configs["mnist"].class_names == NAMES and one.id2label(10)[7] == "seven"
    two = DatasetsConfig({"mnist": DatasetConfig(10, class_names=NAMES), "coin": DatasetConfig(2)})
    assert two.id2label(10)[1] == "mnist/one | coin/1" and two.id2label(10)[5] == "mnist/five"
    assert DatasetsConfig({"mnist": DatasetConfig(10)}).id2label(12)[11] == "11"  # no names: the numbers
    with pytest.raises(ConfigError, match=r"class_names: .*missing.txt not found"):
        DatasetsConfig({"mnist": DatasetConfig(10, class_names=str(tmp_path / "missing.txt"))})
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 10)
    with pytest.raises(ConfigError, match="latin1.txt is not UTF-8 text"):
        DatasetsConfig({"mnist": DatasetConfig(10, class_names=str(tmp_path / "latin1.txt"))})


# a model vLLM's CPU attention takes (head size 64), trained a few steps with class names, exported


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_data) -> dict[str, Path]:
    """A checkpoint of a run with class names (a file), and its vLLM export."""
    work = tmp_path_factory.mktemp("serve")
    model = make_tiny(work / "tiny64", hidden_size=128, head_dim=64)
    (work / "names.txt").write_text("\n".join(NAMES) + "\n")
    config = base_config(model, demo_data, work / "run")
    config["training"].update(max_steps=30, save_steps=30)
    config["datasets"]["dataset_configs"]["mnist"]["class_names"] = str(work / "names.txt")
    config["data"]["max_pixels"] = 56 * 56
    qwen_cls.fit(config)
    checkpoint = work / "run" / "checkpoint-30"
    export = export_model(str(checkpoint), str(work / "vllm"), format="vllm")
    return {"checkpoint": checkpoint, "export": export, "work": work}


def safetensors_names(path: Path) -> list[str]:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return sorted(k for k in json.loads(fh.read(length)) if k != "__metadata__")


@pytest.mark.slow
def test_the_export_is_the_folder_vllm_reads(served):
    checkpoint, export = served["checkpoint"], served["export"]
    hf_config = json.loads((checkpoint / "hf_model" / "config.json").read_text())
    assert (
        hf_config["id2label"]["3"] == "three" and hf_config["classifier_bias"] is False
    )  # servable by default
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForSequenceClassification"]
    assert config["model_type"] == "qwen2_5_vl" and config["num_labels"] == 10
    assert config["id2label"] == {str(i): name for i, name in enumerate(NAMES)}
    assert config["label2id"]["nine"] == 9 and "classifier_head" not in config
    ours = safetensors_names(checkpoint / "hf_model" / "model.safetensors")
    theirs = safetensors_names(export / "model.safetensors")
    assert "score.weight" in ours and "score.bias" not in ours
    assert theirs == sorted("language_model.score.weight" if n == "score.weight" else n for n in ours)
    with (
        safe_open(checkpoint / "hf_model" / "model.safetensors", "pt") as a,
        safe_open(export / "model.safetensors", "pt") as b,
    ):
        assert b.get_tensor("language_model.score.weight").equal(a.get_tensor("score.weight"))
        name = "model.visual.blocks.1.mlp.up_proj.weight"
        assert b.get_tensor(name).equal(a.get_tensor(name))
    serving = json.loads((export / "serving.json").read_text())
    (dataset,) = serving["datasets"]
    assert dataset["name"] == "mnist" and dataset["columns"] == [0, 10] and dataset["class_names"] == NAMES
    assert dataset["prompt"].endswith("<|im_start|>assistant\n") and dataset["question"] in dataset["prompt"]
    assert serving["max_pixels"] == 56 * 56 and serving["logits_masking"] is False
    processor = json.loads((export / "processor_config.json").read_text())
    assert processor["image_processor"]["size"]["longest_edge"] == 56 * 56  # the run's pixel bounds


@pytest.mark.slow
def test_what_cannot_be_served_exactly_is_refused_in_one_line_and_nothing_is_written(
    tiny_model, demo_data, tmp_path, capsys
):
    config = base_config(tiny_model, demo_data, tmp_path / "bias")
    config["training"].update(max_steps=2, save_steps=2)
    config["model"]["head_bias"] = True
    code, _, err = run_main(capsys, "fit", "--config", str(write_config(tmp_path / "b.yaml", config)))
    assert code == 0, err
    arcface = base_config(tiny_model, demo_data, tmp_path / "arcface")
    arcface["training"].update(max_steps=2, save_steps=2)
    arcface["loss"] = {"type": "arcface"}
    code, _, err = run_main(capsys, "fit", "--config", str(write_config(tmp_path / "a.yaml", arcface)))
    assert code == 0, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "bias" / "checkpoint-2", "out1", "model.head_bias: the head in"),
        (tmp_path / "arcface" / "checkpoint-2", "out2", "loss.type: arcface trained a cosine head"),
        (tmp_path / "bias", "out3", "is not a complete checkpoint"),
        (tmp_path / "bias" / "checkpoint-2", "full", "--output: "),
        (tmp_path / "bias" / "checkpoint-2", "file", "is a file"),
    ]
    for checkpoint, output, line in cases:
        code, _, err = run_main(
            capsys, "export", "--checkpoint_path", str(checkpoint), "--output", str(tmp_path / output),
            "--format", "vllm",
        )  # fmt: skip
        last = err.strip().splitlines()[-1]
        assert code == 2 and line in last and last.startswith("qwen-cls: error: "), last
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def images_of_two_sizes(demo_data: Path, folder: Path) -> list[Path]:
    """Eight MNIST digits: four as they are (28x28 grey), four enlarged to 84x56 in RGB."""
    folder.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in (demo_data / "val.jsonl").read_text().splitlines()[:8]]
    paths = []
    for i, row in enumerate(rows):
        image = Image.open(demo_data / row["image_path"])
        if i % 2:
            image = image.convert("RGB").resize((84, 56))
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    return paths


def predicted(checkpoint: Path, images: list[Path]) -> list[dict]:
    predictions = Predictor(checkpoint).predict(images, top_k=10)
    for p in predictions:
        p["by_index"] = [p["probabilities"][p["indices"].index(j)] for j in range(10)]
    return predictions


@pytest.mark.slow
def test_vllm_offline_probabilities_equal_predict(served, demo_data):
    images = images_of_two_sizes(demo_data, served["work"] / "images")
    out = subprocess.run(
        [str(vllm_python()), str(REPO / "scripts" / "vllm_classify.py"), str(served["export"]),
         *map(str, images), "--enforce_eager", "--max_model_len", "512", "--dtype", "float32"],
        capture_output=True, text=True, env=vllm_env(), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    vllm = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ours = predicted(served["checkpoint"], images)
    assert len(vllm) == len(ours) == 8
    for theirs, mine in zip(vllm, ours, strict=True):
        assert max(abs(a - b) for a, b in zip(theirs["probabilities"], mine["by_index"], strict=True)) < 1e-4
        assert theirs["label"] == mine["labels"][0] and theirs["index"] == mine["indices"][0]
        assert theirs["label"] in NAMES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_a_request_with_the_label_and_probabilities_of_predict(served, demo_data):
    python, export = vllm_python(), served["export"]
    port = free_port()
    server = subprocess.Popen(
        # `vllm serve` itself; the vllm-cpu package's `vllm` command looks up the metadata of a package named
        # vllm and fails, so its module is started directly (the same server and arguments)
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--runner", "pooling",
         "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 1}'],
        env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "vllm serve did not start within 300 s"
                time.sleep(2)
        serving = json.loads((export / "serving.json").read_text())
        (dataset,) = serving["datasets"]
        image = images_of_two_sizes(demo_data, served["work"] / "http")[1]
        data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        request = {
            "model": str(export),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": dataset["question"]},
                    ],
                }
            ],
            "add_generation_prompt": True,
        }
        reply = urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/classify",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=120,
        )
        (answer,) = json.loads(reply.read())["data"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    (mine,) = predicted(served["checkpoint"], [image])
    assert answer["label"] == mine["labels"][0] and answer["num_classes"] == 10
    assert max(abs(a - b) for a, b in zip(answer["probs"], mine["by_index"], strict=True)) < 1e-4


@pytest.mark.slow
def test_evaluate_predict_and_report_name_the_classes(served, val_subset, capsys, tmp_path):
    code, out, err = run_main(
        capsys, "evaluate", "--checkpoint_path", str(served["checkpoint"]), "--eval_data", str(val_subset)
    )
    assert code == 0, err
    assert "classes of mnist: zero, one, two, three, four, five, six, seven, eight, nine\n" in out
    code, out, err = run_main(
        capsys, "predict", "--checkpoint_path", str(served["checkpoint"]), "--inputs", str(val_subset),
        "--top_k", "3",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 200 and all(set(p["labels"]) <= set(NAMES) for p in lines)
    code, _, err = run_main(
        capsys, "report", str(served["checkpoint"].parent), "--output", str(tmp_path / "r.md")
    )
    assert code == 0, err
    assert (
        "| classes of mnist | zero, one, two, three, four, five, six, seven, eight, nine |"
        in (tmp_path / "r.md").read_text()
    )


def test_a_classifier_saved_before_head_bias_existed_loads_its_bias(tiny_model, tmp_path):
    """Configs written before ``classifier_bias`` had heads with a bias: they load with it, never dropping it."""
    from transformers import AutoConfig

    from qwen_cls.modeling import QwenVLForImageClassification, classifier_config

    old = QwenVLForImageClassification(
        classifier_config(AutoConfig.from_pretrained(tiny_model), 10, bias=True)
    )
    old.score.bias.data.fill_(0.5)
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["classifier_bias"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    again = QwenVLForImageClassification.from_pretrained(tmp_path / "old")
    assert again.score.bias is not None and again.score.bias.equal(old.score.bias)

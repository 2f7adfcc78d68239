"""The Python API and `qwen-cls predict`: the same results as the CLI, from a notebook or a script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen_cls
from qwen_cls.cli import main
from qwen_cls.errors import ConfigError
from tests.helpers import base_config, run_main, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_run(tiny_model, demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    config = base_config(tiny_model, demo_data, tmp / "unused")
    result = qwen_cls.fit(
        config, training={"max_steps": 8, "save_steps": 4}, **{"training.output_dir": str(tmp / "api")}
    )
    return tmp, config, result


def test_fit_api_and_cli_write_the_same_run(api_run, capsys):
    tmp, config, (model, run_dir) = api_run
    assert isinstance(model, qwen_cls.QwenClassifier) and run_dir == tmp / "api"
    config["training"].update(max_steps=8, save_steps=4, output_dir=str(tmp / "cli"))
    code, _, err = run_main(capsys, "fit", "--config", str(write_config(tmp / "cli.yaml", config)))
    assert code == 0, err[-2000:]
    names = [p.name for p in qwen_cls.FitResult(model, run_dir).checkpoints]
    assert (
        names
        == ["checkpoint-4", "checkpoint-8"]
        == sorted(p.name for p in (tmp / "cli").glob("checkpoint-*"))
    )
    for name in names:
        api_info = json.loads((run_dir / name / "training_info.json").read_text())
        cli_info = json.loads((tmp / "cli" / name / "training_info.json").read_text())
        assert api_info["train_loss"] == pytest.approx(cli_info["train_loss"], abs=1e-6)
    a = load_file(run_dir / "checkpoint-8" / "hf_model" / "model.safetensors")
    b = load_file(tmp / "cli" / "checkpoint-8" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fit_api_raises_instead_of_exiting(tiny_model, demo_data, tmp_path):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    with pytest.raises(ConfigError, match="training.learning_rate"):
        qwen_cls.fit(config, **{"training.learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="not found"):
        qwen_cls.fit(tmp_path / "missing.yaml")
    assert not (tmp_path / "run").exists()


def test_evaluate_api_matches_the_cli_and_evaluate_all(api_run, val_subset, tmp_path, capsys):
    _, _, (_, run_dir) = api_run
    metrics = qwen_cls.evaluate(run_dir / "checkpoint-8", val_subset)
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint_path", str(run_dir / "checkpoint-8"), "--eval_data", str(val_subset),
        "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert code == 0, err[-2000:]
    cli = json.loads((tmp_path / "m.json").read_text())
    assert metrics["overall_samples"] == cli["overall_samples"] == 200
    assert metrics["overall_accuracy"] == pytest.approx(cli["overall_accuracy"], abs=1e-6)
    rows = qwen_cls.evaluate_all(run_dir, val_subset, output_dir=str(tmp_path / "all"), wandb=False)
    assert [r["checkpoint"] for r in rows] == ["checkpoint-4", "checkpoint-8"]
    assert rows[-1]["overall_accuracy"] == pytest.approx(metrics["overall_accuracy"], abs=1e-6)


def test_predictor_agrees_with_evaluate(api_run, val_subset):
    _, _, (_, run_dir) = api_run
    rows = [json.loads(line) for line in val_subset.read_text().splitlines()]
    predictor = qwen_cls.Predictor(
        run_dir / "checkpoint-8" / "hf_model", batch_size=16
    )  # hf_model/ works too
    predictions = predictor.predict([r["image_path"] for r in rows], top_k=3)
    accuracy = sum(p["indices"][0] == r["label"] for p, r in zip(predictions, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(
        qwen_cls.evaluate(run_dir / "checkpoint-8", val_subset)["overall_accuracy"]
    )
    first = predictions[0]
    assert first["labels"] == [str(i) for i in first["indices"]]  # names from id2label
    assert (
        first["probabilities"] == sorted(first["probabilities"], reverse=True)
        and sum(first["probabilities"]) <= 1
    )


def test_predict_command_takes_an_image_a_folder_or_jsonl_and_reports_unreadable_images(
    api_run, demo_data, tmp_path, capsys
):
    _, _, (_, run_dir) = api_run
    images = tmp_path / "images"
    images.mkdir()
    for name in ("00001.png", "00200.png"):
        (images / name).write_bytes((demo_data / "images" / name).read_bytes())
    (images / "broken.png").write_text("not an image")
    rows = [{"image_path": f"images/{n}", "label": 0} for n in ("00001.png", "broken.png")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    code, out, err = run_main(
        capsys, "predict", "--checkpoint_path", str(run_dir), "--inputs", str(images), "--top_k", "2"
    )
    assert code == 0, err[-2000:]
    lines = [json.loads(line) for line in out.splitlines()]
    assert [Path(line["input"]).name for line in lines] == ["00001.png", "00200.png", "broken.png"]
    assert [len(line.get("labels", [])) for line in lines] == [2, 2, 0]
    assert "cannot read image" in lines[2]["error"] and "broken.png" in err

    main(["predict", "--checkpoint_path", str(run_dir / "checkpoint-4"), "--inputs", str(tmp_path / "in.jsonl"),
          "--output", str(tmp_path / "preds.jsonl")])  # fmt: skip
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == [0, 0] and "labels" in preds[0] and "error" in preds[1]

    capsys.readouterr()
    main(["predict", "--checkpoint_path", str(run_dir), "--inputs", str(images / "00001.png")])
    assert len(capsys.readouterr().out.splitlines()) == 1  # the JSON line alone: messages go to stderr

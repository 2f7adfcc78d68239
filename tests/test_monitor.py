"""What a run logs beside the loss: analytical FLOPs, throughput, system metrics, and the W&B history."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoProcessor

from qwen_cls.data import chat_prompt
from qwen_cls.flops import forward_flops, peak_for_name, text_flops, vision_flops
from qwen_cls.loading import load_classifier
from qwen_cls.monitor import redraw_at_checkpoints
from qwen_cls.train import run_lightning_cli
from tests.helpers import base_config, run_log, write_config
from tests.wandb_history import wandb_history, wandb_step_metrics

PERF = {
    "perf/samples_per_second",
    "perf/tokens_per_second",
    "perf/step_time",
    "perf/data_wait_fraction",
    "perf/tflops",
    "perf/mfu",
    "perf/hfu",
}


def test_text_flops_by_hand():
    tc = SimpleNamespace(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16
    )
    # per token and layer: q and o 8x8, k and v 8x4 (one KV head of dim 4), gated MLP 3 x 8x16; x2 per MAC
    per_token = 2 * 2 * (8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16)
    attention = 2 * 4 * 8 * (3**2 + 5**2)  # layers x (QK^T + AV = 4 h s^2)
    assert float(text_flops(tc, torch.tensor([3, 5]))) == per_token * 8 + attention


def test_vision_flops_by_hand_with_windows_and_full_attention_layers():
    vc = SimpleNamespace(
        hidden_size=4, intermediate_size=8, depth=3, fullatt_block_indexes=[2], in_channels=3,
        temporal_patch_size=2, patch_size=14, spatial_merge_size=2, window_size=56, out_hidden_size=6,
    )  # fmt: skip
    grid = torch.tensor([[1, 4, 6]])  # 24 patches; merged 2x3; windows of 2x2 merged tokens: 2x2 and 2x1
    patches = 24
    linear = 2 * patches * (3 * 2 * 14 * 14 * 4 + 3 * (4 * 4 * 4 + 3 * 4 * 8))
    merger = 2 * (patches // 4) * (16 * 16 + 16 * 6)
    windows = [2 * 2 * 4, 2 * 1 * 4]  # patches per window
    attention = 4 * 4 * (2 * sum(w * w for w in windows) + 1 * patches**2)
    assert float(vision_flops(vc, grid)) == linear + merger + attention


@pytest.fixture(scope="module")
def wide_batch(tiny_model):
    """Two 168x280 px images: 12x20 patches each, so windowed attention has several windows."""
    processor = AutoProcessor.from_pretrained(tiny_model)
    prompt = chat_prompt(processor, "Which {dataset} class is this image?", "mnist", "")
    pixels = 168 * 280
    images = [Image.new("RGB", (280, 168), (30, 60, 90)), Image.new("RGB", (280, 168), (200, 10, 10))]
    return processor(
        text=[prompt, prompt],
        images=images,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        padding=True,
        return_tensors="pt",
    )


def test_flops_agree_with_torch_flop_counter(tiny_model, wide_batch):
    assert wide_batch["image_grid_thw"].tolist() == [[1, 12, 20]] * 2
    model = load_classifier(str(tiny_model), 10, torch.float32, "eager")  # attention as countable matmuls
    lengths = wide_batch["attention_mask"].sum(-1)
    estimate = float(forward_flops(model.config, lengths, wide_batch["image_grid_thw"]))
    with FlopCounterMode(display=False) as forward:
        model(**wide_batch)
    assert estimate == pytest.approx(forward.get_total_flops(), rel=0.02)
    with FlopCounterMode(display=False) as training:
        model(**wide_batch).logits.sum().backward()
    assert 3 * estimate == pytest.approx(training.get_total_flops(), rel=0.15)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_table_matches_device_names(name, tflops):
    assert peak_for_name(name) == (tflops and tflops * 1e12)


def _rows(run: Path) -> list[dict]:
    with run_log(run).open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_no_evaluation_run_logs_perf_and_train_metrics_to_csv_and_offline_wandb(
    tiny_model, demo_data, tmp_path
):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["wandb"] = {"enabled": True, "project": "qwen-cls-tests", "log_dataset_metrics": True}
    config["monitor"] = {"peak_tflops": 0.5}  # CPUs have no table entry; MFU is logged against this peak
    path = write_config(tmp_path / "c.yaml", config, training={"max_steps": 6, "save_steps": 3})
    run_lightning_cli(["fit", "--config", str(path)])

    rows = _rows(tmp_path / "run")
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/epoch", "train/mnist_accuracy", *PERF}
    expected.add("system/host_memory_rss_gb")
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(expected <= {k for k, v in r.items() if v} for r in rows)
    assert not [k for k in rows[0] if k.startswith(("eval/", "best"))]

    tokens_per_sample = 34  # every demo prompt: 30 text tokens + 4 visual tokens
    for r in rows:
        samples_per_second = float(r["perf/samples_per_second"])
        assert samples_per_second * float(r["perf/step_time"]) == pytest.approx(8, rel=1e-3)  # batch size
        assert float(r["perf/tokens_per_second"]) / samples_per_second == pytest.approx(tokens_per_sample)
        assert float(r["perf/mfu"]) == pytest.approx(float(r["perf/tflops"]) / 0.5, rel=1e-4)
        assert 0 <= float(r["perf/data_wait_fraction"]) < 1

    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["trainer/global_step"] for h in history] == [2, 4, 6]
    for h, r in zip(history, rows, strict=True):
        assert expected <= set(h)
        assert h["train/loss"] == pytest.approx(float(r["train/loss"]))
        assert h["perf/tflops"] == pytest.approx(float(r["perf/tflops"]))
    assert not [k for h in history for k in h if k.startswith(("eval/", "best"))]
    declared = wandb_step_metrics(run_file)
    assert all(declared[f"{p}/*"] == "trainer/global_step" for p in ("train", "perf", "system", "eval"))


@pytest.mark.slow
def test_standard_mode_logs_evaluation_against_the_step_it_evaluates(tiny_model, demo_data, tmp_path):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["wandb"] = {"enabled": True, "project": "qwen-cls-tests"}
    config["datasets"]["dataset_configs"]["mnist"]["eval_ratio"] = 0.05
    path = write_config(
        tmp_path / "c.yaml", config, training={"skip_evaluation": False, "max_steps": 6, "save_steps": 3}
    )
    run_lightning_cli(["fit", "--config", str(path)])
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    evaluated = [h for h in wandb_history(run_file) if "eval/overall_accuracy" in h]
    # partial evaluations (the 5% subset) at 3 and 6, then the full one at the end, of step 6's weights
    assert [(h["trainer/global_step"], h["eval/overall_samples"]) for h in evaluated] == [
        (3, 50),
        (6, 50),
        (6, 1000),
    ]


@pytest.mark.slow
def test_train_loss_is_the_mean_over_accumulated_micro_batches(tiny_model, demo_data, tmp_path):
    """Batches of 4 accumulated twice see the same 8 images per step as batches of 8: same loss and counts."""
    losses = {}
    for batch_size, accumulate in ((8, 1), (4, 2)):
        run = tmp_path / f"bs{batch_size}"
        config = base_config(tiny_model, demo_data, run)
        config["data"]["batch_size"] = batch_size
        config["trainer"]["accumulate_grad_batches"] = accumulate
        path = write_config(tmp_path / "c.yaml", config, training={"max_steps": 4, "logging_steps": 1})
        run_lightning_cli(["fit", "--config", str(path)])
        rows = _rows(run)
        losses[accumulate] = [float(r["train/loss"]) for r in rows]
        assert [
            float(r["perf/samples_per_second"]) * float(r["perf/step_time"]) for r in rows
        ] == pytest.approx([8.0] * 4, rel=1e-3)
    assert losses[2] == pytest.approx(losses[1], abs=1e-4)


@pytest.mark.parametrize(
    ("setting", "cuda", "cpus", "processes", "threads", "workers", "redraw"),
    [
        (True, False, 2, 1, 2, 0, True),  # true: always, whatever it costs
        (False, True, 64, 8, 1, 4, False),
        ("auto", True, 16, 8, 1, 1, True),  # a GPU run: compute threads wait on the device
        ("auto", False, 2, 1, 2, 0, False),  # this machine: both cores compute
        ("auto", False, 4, 1, 2, 1, True),  # a spare core
        ("auto", False, 4, 2, 1, 1, False),  # 2 processes x (1 thread + 1 worker) take the 4 cores
        ("auto", False, 8, 2, 2, 1, True),
    ],
)
def test_plots_auto_redraws_at_checkpoints_only_with_a_core_to_spare(
    setting, cuda, cpus, processes, threads, workers, redraw
):
    assert redraw_at_checkpoints(setting, cuda, cpus, processes, threads, workers) is redraw

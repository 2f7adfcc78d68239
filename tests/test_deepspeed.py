"""DeepSpeed ZeRO-2 and ZeRO-3 for real: 2 CPU processes over gloo (the CPU subclass of Lightning's strategy),
the tiny model, the CLI as users run it. Exact checkpoint folders, full weights in hf_model/, the module's
logits, export, SIGKILL and resume, evaluation and validation of a ZeRO-3 run, and the YAML mapping."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from qwen_cls.errors import ConfigError
from qwen_cls.modeling import MODEL_INPUTS
from qwen_cls.strategy import CPUDeepSpeedStrategy, build_strategy, deepspeed_kwargs
from tests.helpers import REPO, base_config, child_env, run_main, write_config

STEPS, EVERY = 6, 3


def run(*args: str, kill_group: bool = False) -> subprocess.CompletedProcess:
    """A command in its own process group (KillAtStep kills that group: every rank)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_env(),
        start_new_session=kill_group,
    )


def ds_config(tiny_model, demo_data, out: Path, stage: int, standard: bool = False, val=None) -> dict:
    config = base_config(tiny_model, demo_data, out)
    config["data"]["batch_size"] = 4
    config["training"].update(max_steps=STEPS, save_steps=EVERY, logging_steps=1)
    config["trainer"].update(devices=2, strategy=f"deepspeed_stage_{stage}")
    config["monitor"] = {"plots": False}
    if standard:
        config["data"]["val_jsonl"] = str(val)
        config["training"].update(skip_evaluation=False, eval_steps=EVERY)
        config["evaluation"] = {
            "partial_eval_during_training": True,
            "full_eval_at_end": True,
            "eval_best_model_only": True,
        }
        config["best_model_tracking"] = {"enabled": True, "metric": "overall_loss", "mode": "min"}
    return config


def qwen_cls(*args: str, kill_group: bool = False) -> subprocess.CompletedProcess:
    return run("-m", "qwen_cls", *args, kill_group=kill_group)


def fit_with_logits(config: dict, path: Path, rows: Path) -> dict:
    out = run(
        "-m",
        "tests.helpers",
        "fit_and_save_logits",
        str(write_config(path, config)),
        str(rows),
        str(path.with_suffix(".pt")),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return torch.load(path.with_suffix(".pt"), weights_only=True)


def killed_and_resumed(config: dict, output_dir: Path, tmp_path: Path) -> Path:
    """The same run into ``output_dir``, SIGKILLed (every rank) right after step 4, then resumed with
    --ckpt_path last."""
    config = {**config, "training": {**config["training"], "output_dir": str(output_dir)}}
    killed = json.loads(json.dumps(config))
    killed["trainer"]["callbacks"] = [
        {"class_path": "tests.helpers.SignalAtStep", "init_args": {"step": 4, "group": True}}
    ]
    out = qwen_cls(
        "fit",
        "--config",
        str(write_config(tmp_path / "killed.yaml", killed)),
        kill_group=True,
    )
    assert out.returncode == -9, out.stderr[-3000:]
    run_dir = Path(config["training"]["output_dir"])
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    out = qwen_cls(
        "fit",
        "--config",
        str(write_config(tmp_path / "resume.yaml", config)),
        "--ckpt_path",
        "last",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


def hf_logits(hf_dir: Path, batch: dict) -> torch.Tensor:
    model = AutoModelForImageClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits


def assert_same_weights(a_dir: Path, b_dir: Path, atol: float) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


@dataclass
class ZeroRun:
    config: dict
    path: Path  # its YAML
    run_dir: Path
    saved: dict  # a batch and the trained module's logits on it


def zero_run(stage: int, tiny_model, demo_data, val_subset, tmp: Path) -> ZeroRun:
    """One 2-process run per stage, shared by this module's tests: ZeRO-2 in no-evaluation mode, ZeRO-3 in
    standard mode (evaluation, best model, final evaluation). Each test copies what it changes."""
    config = ds_config(tiny_model, demo_data, tmp / "run", stage, stage == 3, val_subset)
    saved = fit_with_logits(config, tmp / "run.yaml", val_subset)
    return ZeroRun(config, tmp / "run.yaml", tmp / "run", saved)


@pytest.fixture(scope="module")
def zero2_run(tiny_model, demo_data, val_subset, tmp_path_factory) -> ZeroRun:
    return zero_run(2, tiny_model, demo_data, val_subset, tmp_path_factory.mktemp("zero2"))


@pytest.fixture(scope="module")
def zero3_run(tiny_model, demo_data, val_subset, tmp_path_factory) -> ZeroRun:
    return zero_run(3, tiny_model, demo_data, val_subset, tmp_path_factory.mktemp("zero3"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_fit_checkpoints_logits_export_and_resume(stage, request, val_subset, tmp_path, capsys):
    """ZeRO-2 in no-evaluation mode; ZeRO-3 in standard mode (evaluation, best model, final evaluation)."""
    zero: ZeroRun = request.getfixturevalue(f"zero{stage}_run")
    standard = stage == 3
    run_dir = zero.run_dir
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint-" in p.name) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    for name in ("checkpoint-3", "checkpoint-6"):
        info = json.loads((run_dir / name / "training_info.json").read_text())
        assert (info["step"], info["world_size"], info["strategy"]) == (
            int(name[11:]),
            2,
            "CPUDeepSpeedStrategy",
        )
        shards = sorted(p.name for p in (run_dir / name / "deepspeed" / "checkpoint").iterdir())
        assert [s for s in shards if s.endswith("optim_states.pt")] == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
        ]
    # the module ends with the weights of the last step, or in standard mode (eval_best_model_only) with the
    # best checkpoint's, loaded for the final evaluation where DeepSpeed's loader fails (#7272)
    last = (
        json.loads((run_dir / "best_checkpoint.json").read_text())["checkpoint"]
        if standard
        else "checkpoint-6"
    )
    hf_dir = run_dir / last / "hf_model"
    weights = load_file(hf_dir / "model.safetensors")
    assert all(t.numel() > 0 for t in weights.values())
    assert sum(t.numel() for t in weights.values()) > 300_000  # the whole model, not one rank's partition
    assert torch.allclose(hf_logits(hf_dir, zero.saved["batch"]), zero.saved["logits"], atol=1e-5)

    code, _, err = run_main(
        capsys, "export", "--checkpoint_path", str(run_dir / last), "--output", str(tmp_path / "exp")
    )
    assert code == 0, err[-3000:]
    assert_same_weights(hf_dir, tmp_path / "exp", atol=0.0)

    if standard:
        final = json.loads((run_dir / "eval_final.json").read_text())
        best = json.loads((run_dir / "best_checkpoint.json").read_text())
        assert final["weights"] == best["checkpoint"]
        code, _, err = run_main(
            capsys,
            "evaluate",
            "--checkpoint_path",
            str(run_dir / best["checkpoint"]),
            "--eval_data",
            str(val_subset),
            "--output",
            str(tmp_path / "eval.json"),
        )
        assert code == 0, err[-3000:]
        evaluated = json.loads((tmp_path / "eval.json").read_text())
        for key in ("overall_loss", "overall_accuracy", "overall_top5_accuracy"):
            assert evaluated[key] == pytest.approx(final[key], abs=1e-4), key

    resumed = killed_and_resumed(zero.config, tmp_path / "resumed", tmp_path)
    assert sorted(p.name for p in resumed.iterdir() if "checkpoint-" in p.name) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    assert_same_weights(
        run_dir / "checkpoint-6" / "hf_model", resumed / "checkpoint-6" / "hf_model", atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_a_gpu_in_bf16(stage, tiny_model, demo_data, val_subset, tmp_path):
    """The same path on CUDA (Lightning's own strategy), bf16-mixed, one GPU: bf16 hf_model/ with the module's
    logits, export equal to it, SIGKILL and resume."""
    config = ds_config(tiny_model, demo_data, tmp_path / "run", stage)
    config["data"]["batch_size"] = 8
    config["trainer"].update(accelerator="gpu", devices=1, precision="bf16-mixed")
    saved = fit_with_logits(config, tmp_path / "run.yaml", val_subset)
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "checkpoint-6" / "training_info.json").read_text())
    assert info["strategy"] == "QwenDeepSpeedStrategy"
    hf_dir = run_dir / "checkpoint-6" / "hf_model"
    weights = load_file(hf_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and all(
        t.numel() for t in weights.values()
    )
    # bf16 on the GPU vs bf16 on the CPU: kernels differ in the last bits
    assert torch.allclose(hf_logits(hf_dir, saved["batch"]).float(), saved["logits"], atol=5e-2)
    out = qwen_cls(
        "export",
        "--checkpoint_path",
        str(run_dir / "checkpoint-6"),
        "--output",
        str(tmp_path / "exp"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(hf_dir, tmp_path / "exp", atol=0.0)  # bf16 of the fp32 masters is the module's copy
    resumed = killed_and_resumed(config, tmp_path / "resumed", tmp_path)
    assert_same_weights(
        run_dir / "checkpoint-6" / "hf_model", resumed / "checkpoint-6" / "hf_model", atol=1e-3
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_validate_a_zero3_checkpoint(zero3_run, val_subset, tmp_path, capsys):
    """`qwen-cls validate --ckpt_path checkpoint-N` under ZeRO-3, where DeepSpeed's own loader fails
    (deepspeedai/DeepSpeed#7272): the numbers equal `evaluate` of the same checkpoint's hf_model/."""
    checkpoint = zero3_run.run_dir / "checkpoint-3"
    out = qwen_cls(
        "validate",
        "--config",
        str(zero3_run.path),
        "--data.val_jsonl",
        str(val_subset),
        "--ckpt_path",
        str(checkpoint),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    validated = float(re.search(r"eval/overall_loss\s*│\s*([0-9.]+)", out.stdout).group(1))
    code, _, err = run_main(
        capsys,
        "evaluate",
        "--checkpoint_path",
        str(checkpoint),
        "--eval_data",
        str(val_subset),
        "--output",
        str(tmp_path / "e.json"),
    )
    assert code == 0, err[-3000:]
    assert validated == pytest.approx(json.loads((tmp_path / "e.json").read_text())["overall_loss"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_checkpoint_with_only_shards_is_evaluated_under_zero3_or_pointed_to_export(
    zero2_run, val_subset, tmp_path, capsys
):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(zero2_run.run_dir / "checkpoint-3", checkpoint)
    original = load_file(checkpoint / "hf_model" / "model.safetensors")
    shutil.rmtree(checkpoint / "hf_model")
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint_path", str(checkpoint), "--eval_data", str(val_subset)
    )
    assert code == 2
    assert err.strip() == (
        f"qwen-cls: error: --checkpoint_path: {checkpoint} has no hf_model/, only DeepSpeed shards in deepspeed/; "
        f"rebuild it with: qwen-cls export --checkpoint_path {checkpoint}, or evaluate it with --strategy "
        "deepspeed_stage_3, which reads the shards"
    )
    # under ZeRO-3 the shards are read into the partitions: the numbers of the hf_model/ the run saved
    out = qwen_cls(
        "evaluate",
        "--checkpoint_path",
        str(checkpoint),
        "--eval_data",
        str(val_subset),
        "--devices",
        "2",
        "--strategy",
        "deepspeed_stage_3",
        "--output",
        str(tmp_path / "shards.json"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    code, _, err = run_main(
        capsys,
        "evaluate",
        "--checkpoint_path",
        str(zero2_run.run_dir / "checkpoint-3"),
        "--eval_data",
        str(val_subset),
        "--output",
        str(tmp_path / "hf.json"),
    )
    assert code == 0, err[-3000:]
    from_shards, from_hf = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("shards", "hf"))
    assert from_shards["overall_samples"] == from_hf["overall_samples"] == 200
    assert from_shards["overall_accuracy"] == from_hf["overall_accuracy"]
    assert from_shards["overall_loss"] == pytest.approx(from_hf["overall_loss"], abs=1e-5)
    assert run_main(capsys, "export", "--checkpoint_path", str(checkpoint))[0] == 0
    rebuilt = load_file(checkpoint / "hf_model" / "model.safetensors")
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint_path", str(checkpoint), "--eval_data", str(val_subset)
    )
    assert code == 0, err[-3000:]


@pytest.mark.slow  # the shared ZeRO-2 run: 2 processes
@pytest.mark.multiprocess
def test_a_vllm_export_of_a_checkpoint_with_shards_only_goes_through_the_gather(zero2_run, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(zero2_run.run_dir / "checkpoint-3", checkpoint)
    original = load_file(checkpoint / "hf_model" / "model.safetensors")
    shutil.rmtree(checkpoint / "hf_model")
    code, _, err = run_main(
        capsys,
        "export",
        "--checkpoint_path",
        str(checkpoint),
        "--format",
        "vllm",
        "--output",
        str(tmp_path / "vl"),
    )
    assert code == 0, err[-3000:]
    served = load_file(tmp_path / "vl" / "model.safetensors")
    assert torch.equal(served.pop("language_model.score.weight"), original.pop("score.weight"))
    assert served.keys() == original.keys() and all(torch.equal(served[k], original[k]) for k in original)


@pytest.mark.parametrize(
    ("strategy", "section", "stage", "offload_optimizer", "offload_param"),
    [
        ("deepspeed_stage_2", None, 2, False, False),
        ("deepspeed_stage_2_offload", None, 2, True, False),
        ("deepspeed_stage_3", None, 3, False, False),
        ("deepspeed_stage_3_offload", None, 3, True, True),
        (None, {"zero_optimization": {"stage": 3}}, 3, False, False),
        (
            "auto",
            {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"},
            2,
            False,
            False,
        ),
        (
            "deepspeed",
            {
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "gradient_accumulation_steps": 2,
            },
            2,
            True,
            False,
        ),
        (
            None,
            {
                "zero_optimization": {"stage": 3},
                "train_micro_batch_size_per_gpu": 8,
                "bf16": {"enabled": "auto"},
            },
            3,
            False,
            False,
        ),
    ],
)
def test_strategy_and_deepspeed_section_map_to_deepspeed_settings(
    strategy, section, stage, offload_optimizer, offload_param
):
    """The micro-batch is data.batch_size (8); accumulation (2) and clipping are left to Lightning, which fills
    them from the trainer, so a section may repeat them only with the same values."""
    kwargs = deepspeed_kwargs(strategy, section, batch_size=8, accumulate=2, max_grad_norm=1.0)
    ds = build_strategy(kwargs, cuda=False)
    assert isinstance(ds, CPUDeepSpeedStrategy)
    zero = ds.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero and zero["offload_optimizer"]["device"] == "cpu") == offload_optimizer
    assert ("offload_param" in zero and zero["offload_param"]["device"] == "cpu") == offload_param
    assert ds.config["train_micro_batch_size_per_gpu"] == 8
    assert "gradient_accumulation_steps" not in ds.config and "bf16" not in ds.config
    assert ds.config.get("zero_force_ds_cpu_optimizer", True) is not offload_optimizer  # torch AdamW on CPU


def test_deepspeed_json_file_and_no_deepspeed(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    assert deepspeed_kwargs(None, str(path), 4, 1, 0.0)["config"] == {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": 4,
        "zero_allow_untested_optimizer": True,
    }
    assert deepspeed_kwargs("ddp", None, 4, 1, 1.0) is None
    assert deepspeed_kwargs("auto", None, 4, 1, 1.0) is None


@pytest.mark.parametrize(
    ("strategy", "section", "message"),
    [
        (
            None,
            {"train_micro_batch_size_per_gpu": 16},
            "deepspeed.train_micro_batch_size_per_gpu: 16, but data.batch_size is 8",
        ),
        (
            None,
            {"gradient_accumulation_steps": 4},
            "deepspeed.gradient_accumulation_steps: 4, but trainer.accumulate_grad_batches is 2",
        ),
        (None, {"train_batch_size": 64}, "deepspeed.train_batch_size: remove it"),
        (None, {"optimizer": {"type": "Adam"}}, "deepspeed.optimizer: remove it"),
        (None, {"scheduler": {"type": "WarmupLR"}}, "deepspeed.scheduler: remove it"),
        (
            "deepspeed_stage_3",
            {"zero_optimization": {"stage": 2}},
            "trainer.strategy: 'deepspeed_stage_3' and a deepspeed: section",
        ),
        ("ddp", {"zero_optimization": {"stage": 2}}, "trainer.strategy: 'ddp' and a deepspeed: section"),
        ("deepspeed_stage_9", None, "trainer.strategy: unknown 'deepspeed_stage_9'"),
        (None, "/nonexistent/ds.json", "deepspeed: /nonexistent/ds.json not found"),
    ],
)
def test_conflicting_deepspeed_settings_are_config_errors(strategy, section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        deepspeed_kwargs(strategy, section, batch_size=8, accumulate=2, max_grad_norm=1.0)

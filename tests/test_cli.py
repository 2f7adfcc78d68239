"""The `qwen-cls` command as a user runs it: exit codes, one-line errors. Through `main` (what the console script
calls) in this process; a real subprocess where the process itself is under test (a bad row: exit status and
stderr of the command; the process group at exit)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from qwen_cls.cli import main
from qwen_cls.data import QwenDataModule
from qwen_cls.model import QwenClassifier
from qwen_cls.strategy import deepspeed_kwargs
from qwen_cls.train import QwenCLI
from tests.helpers import REPO, base_config, run_main, write_config


def qwen_cls(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_cls", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command_and_each_commands_help_runs(capsys):
    from qwen_cls.commands import COMMANDS

    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()] == list(
        COMMANDS
    )
    for name in ("fit", "validate"):  # LightningCLI's
        code, out, _ = run_main(capsys, name, "--help")
        assert code == 0 and "--config CONFIG" in out and "--training.skip_evaluation" in out
    # the tools' help, --help and --version in a fresh interpreter: nothing heavy is imported for them
    tools = [name for name, command in COMMANDS.items() if command.function is not None]
    script = (
        "import sys\nfrom qwen_cls.cli import main\n"
        f"for args in [['--help'], ['--version'], *[[t, '--help'] for t in {tools!r}]]:\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code, (args, e.code)\n"
        "import qwen_cls.run_dir, qwen_cls.reporting\n"  # the run folder and the report read runs without them too
        "print('heavy:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'transformers'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for name in tools:
        assert f"usage: qwen-cls {name} " in done.stdout
    assert done.stdout.splitlines()[-1] == "heavy: []"
    code, _, err = run_main(capsys, "trian", "--config", "x.yaml")
    assert code == 2 and err.strip() == (
        f"qwen-cls: error: 'trian' is not a command; choose one of {', '.join(COMMANDS)} (qwen-cls --help)"
    )


def test_reference_configs_parse(capsys):
    code, out, err = run_main(
        capsys, "fit", "--config", str(REPO / "configs/food101_no_eval_save_all.yaml"), "--print_config"
    )
    assert code == 0, err
    assert "skip_evaluation: true" in out and "num_labels: 101" in out
    assert "project: qwen_classify_no_eval" in out
    assert out.splitlines()[-1].startswith("#") and "# when the run starts, the resolver changes " in out
    code, out, err = run_main(
        capsys, "fit", "--config", str(REPO / "configs/qwen72b_zero3_offload.yaml"), "--print_config"
    )
    assert code == 0, err
    config = yaml.safe_load(out)
    kwargs = deepspeed_kwargs(config["trainer"]["strategy"], config["deepspeed"], 2, 4, 1.0)
    zero = kwargs["config"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert kwargs["config"]["train_micro_batch_size_per_gpu"] == 2


def test_demo_config_instantiates(tiny_model, demo_data, tmp_path):
    cli = QwenCLI(
        QwenClassifier,
        QwenDataModule,
        run=False,
        args=[
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"--model.pretrained_name={tiny_model}",
            f"--data.train_jsonl={demo_data / 'train.jsonl'}",
            f"--training.output_dir={tmp_path}",
        ],
    )
    assert cli.model.hparams.num_labels == 10 and cli.model.train_config.lr == pytest.approx(2e-3)
    # the module and the data module are handed the sections the parser built, as the resolver left them
    assert (
        cli.model.train_config.save_all_checkpoints is True
        and cli.model.loss_config.type == "label_smoothing"
    )
    assert cli.datamodule.dataset_configs == cli.model.datasets.dataset_configs
    assert cli.datamodule.batch_size == 32 and cli.datamodule.processor_path == str(tiny_model)
    assert cli.trainer.limit_val_batches == 0 and cli.trainer.num_sanity_val_steps == 0
    assert cli.trainer.max_epochs == 4 and cli.trainer.log_every_n_steps == 10


def run_fit(tmp_path, config: dict, *extra: str) -> subprocess.CompletedProcess:
    path = write_config(tmp_path / "config.yaml", config)
    return qwen_cls("fit", "--config", str(path), *extra)


def assert_clean_failure(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


@pytest.mark.slow
def test_bad_row_stops_before_training_with_file_and_line(tiny_model, demo_data, tmp_path):
    rows = []
    for line in (demo_data / "train.jsonl").read_text().splitlines()[:20]:
        row = json.loads(line)
        rows.append(json.dumps({**row, "image_path": str(demo_data / row["image_path"])}))
    rows[6] = json.dumps(
        {"image_path": str(demo_data / "images" / "00000.png"), "label": 12, "dataset_name": "mnist"}
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["data"]["train_jsonl"] = str(bad)
    out = run_fit(tmp_path, config)
    assert_clean_failure(out, f"{bad}:7:", "label 12 out of range")
    assert not list((tmp_path / "run").glob("checkpoint-*")) if (tmp_path / "run").exists() else True


CHOICE = "is not a choice; choose one of"


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["--training.save_dtype=float16"],
            f"training.save_dtype: 'float16' {CHOICE} auto, bfloat16, float32",
        ),
        (
            ["--loss.type=focal_typo"],
            f"loss.type: 'focal_typo' {CHOICE} cross_entropy, label_smoothing, focal, arcface, symmetric_ce",
        ),
        (["--data.on_bad_image=ignore"], f"data.on_bad_image: 'ignore' {CHOICE} error, skip"),
        (["--data.check_images=full"], f"data.check_images: 'full' {CHOICE} header, exists, none"),
        (["--training.disk_check=maybe"], f"training.disk_check: 'maybe' {CHOICE} error, warn, off"),
        (
            ["--training.on_nonfinite_loss=zero"],
            f"training.on_nonfinite_loss: 'zero' {CHOICE} error, skip_step",
        ),
        (
            ["--model.attn_implementation=flash3"],
            f"model.attn_implementation: 'flash3' {CHOICE} auto, flash_attention_2, sdpa, eager",
        ),
        (["--model.torch_dtype=fp8"], f"model.torch_dtype: 'fp8' {CHOICE} auto, float32, bfloat16, float16"),
        (["--best_model_tracking.mode=median"], f"best_model_tracking.mode: 'median' {CHOICE} max, min"),
        (["--monitor.plots=sometimes"], f"monitor.plots: 'sometimes' {CHOICE} true, false, auto"),
        (["--training.lr=abc"], "training.lr: expected float, got 'abc'"),
        (["--training.bogus=1"], "training.bogus: unknown key"),
        (["--training.bogus", "1"], "training.bogus: unknown key"),
    ],
)
def test_bad_values_and_keys_are_one_line_at_parse_time(tiny_model, demo_data, tmp_path, capsys, args, line):
    """Choices are typed: jsonargparse refuses a value outside them while parsing, before anything is built,
    and the user reads one line naming the key and the choices."""
    path = write_config(tmp_path / "config.yaml", base_config(tiny_model, demo_data, tmp_path / "run"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"qwen-cls: error: {line}"]
    assert not (tmp_path / "run").exists()


def test_help_lists_the_choices_and_tools_refuse_bad_ones_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for choices in (
        "{error,skip}",
        "{header,exists,none}",
        "{error,warn,off}",
        "{auto,flash_attention_2,sdpa,eager}",
    ):
        assert choices in shown
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint_path", "x", "--dtype", "float8"])
    assert capsys.readouterr().err.strip() == (
        f"qwen-cls: error: dtype: 'float8' {CHOICE} auto, float32, bfloat16, float16"
    )


def test_unknown_yaml_key_is_rejected(tiny_model, demo_data, tmp_path, capsys):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"]["save_every"] = 5
    code, _, err = run_main(capsys, "fit", "--config", str(write_config(tmp_path / "config.yaml", config)))
    assert code == 2 and err.strip().splitlines() == ["qwen-cls: error: training.save_every: unknown key"]
    assert not (tmp_path / "run").exists()


def test_a_rank_other_than_zero_says_its_error_too_tagged_with_its_rank(
    tiny_model, demo_data, tmp_path, capsys, monkeypatch
):
    """Not rank 0 alone: a launcher ends the other ranks when the first one exits, often before rank 0 speaks
    (the Slurm test in test_launch.py shows it end to end)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"]["save_every"] = 5
    code, _, err = run_main(capsys, "fit", "--config", str(write_config(tmp_path / "config.yaml", config)))
    assert code == 2 and err.strip().splitlines() == [
        "qwen-cls: error: rank 1: training.save_every: unknown key"
    ]


def test_evaluate_takes_the_seeds_flags_and_reports_missing_checkpoints(tmp_path, demo_data, capsys):
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint_path", str(tmp_path), "--eval_data", str(demo_data / "val.jsonl")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--checkpoint_path" in err and "neither a checkpoint folder" in err


@pytest.mark.slow
def test_progress_outside_a_terminal_is_plain_lines(tiny_model, demo_data, tmp_path, capsys):
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"].update(max_steps=4, save_steps=4, logging_steps=2)
    config["trainer"].pop("enable_progress_bar")
    from qwen_cls.train import run_lightning_cli

    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    assert all(f"| {key} " in lines[0] for key in ("loss", "lr", "samples/s")), lines[0]
    assert "steps/s" in lines[0] and "ETA" in lines[0]
    assert "\r" not in out and "\x1b" not in out


@pytest.mark.slow
def test_a_successful_command_ends_the_process_group(tmp_path):
    """Left to interpreter exit, gloo's threads can abort a run that succeeded (exit -6 seen in CI)."""
    script = (
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "from qwen_cls.cli import main\n"
        f"main(['make-tiny', '{tmp_path / 'tiny'}', '--hidden_size', '32', '--layers', '1'])\n"
        "print('initialized after:', dist.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "initialized after: False" in done.stdout

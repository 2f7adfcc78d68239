"""The config sections (``datasets``, ``training``, ``evaluation``, ...) as typed dataclasses; jsonargparse builds the CLI and YAML schema from them.

``model:`` and ``data:`` are the init arguments of the LightningModule and the LightningDataModule;
``loss:`` lives in :mod:`qwen_cls.losses`. How ``training.skip_evaluation`` overrides the rest is in
:mod:`qwen_cls.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The choices of the config's string keys: jsonargparse refuses any other value when it parses the config,
# listing these, and `--help` shows them.
DiskCheck = Literal["error", "warn", "off"]
OnNonFiniteLoss = Literal["error", "skip_step"]
OnBadImage = Literal["error", "skip"]
SaveDtype = Literal["auto", "bfloat16", "float32"]
BestMode = Literal["max", "min"]


@dataclass
class DatasetConfig:
    """One dataset of ``datasets.dataset_configs``.

    Args:
        num_classes: labels of this dataset are 0 .. num_classes-1.
        description: a few words used in the prompt (``{description}`` in ``data.prompt_template``).
        eval_ratio: fraction of this dataset's validation rows used by the partial evaluation during training.
    """

    num_classes: int
    description: str = ""
    eval_ratio: float = 1.0


@dataclass
class LoraSettings:
    """``model.lora``: low-rank adapters (peft's LoRA) instead of a full fine-tune. The head always trains in full.

    Args:
        enabled: train adapters on the chosen projections; the base weights stay frozen.
        r: the adapters' rank (>= 1).
        alpha: the update is scaled by alpha / r.
        dropout: dropout on the adapters' input, in [0, 1).
        target_modules: module-name suffixes to adapt (e.g. ``[q_proj, v_proj]``); default: the language model's
            attention and MLP projections (q, k, v, o, gate, up, down).
        vision: also adapt the vision tower's attention and MLP projections (``target_modules`` default only).
        modules_to_save: modules trained in full besides the head (``score``), e.g. ``[model.visual.merger]``.
    """

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    vision: bool = False
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class DatasetsConfig:
    """The ``datasets:`` section: every dataset a JSONL row may name.

    Args:
        dataset_configs: one entry per dataset name.
        enable_logits_masking: each row's logits beyond its dataset's num_classes are masked for the loss,
            the prediction and the metrics (datasets share one head; their labels are local).
    """

    dataset_configs: dict[str, DatasetConfig] = field(default_factory=dict)
    enable_logits_masking: bool = True


@dataclass
class EvaluationConfig:
    """The ``evaluation:`` section (standard mode; all forced off by ``training.skip_evaluation``)."""

    partial_eval_during_training: bool = True
    full_eval_at_end: bool = True
    eval_best_model_only: bool = False


@dataclass
class BestModelTrackingConfig:
    """The ``best_model_tracking:`` section (standard mode)."""

    enabled: bool = True
    metric: str = "overall_accuracy"
    mode: BestMode = "max"
    save_best_only: bool = False


@dataclass
class TrainingConfig:
    """The ``training:`` section.

    Args:
        epochs: passes over the training data.
        max_steps: stop after this many optimizer steps (-1: run all epochs).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (never applied to norms and biases).
        warmup_steps: linear warm-up length in optimizer steps, or a fraction of all steps when < 1.
        max_grad_norm: clip the gradient norm to this value (0 disables clipping).
        gradient_checkpointing: recompute activations in backward to save memory.
        output_dir: where checkpoints, logs and the config are written.
        overwrite_output_dir: allow a fresh run into an output_dir that already holds checkpoints.
        logging_steps: log train metrics every this many optimizer steps.
        save_steps: write a checkpoint every this many optimizer steps (and always at the end).
        eval_steps: evaluate every this many optimizer steps (standard mode only).
        skip_evaluation: no-evaluation mode; wins over every evaluation and best-model key.
        save_all_checkpoints: keep every checkpoint rather than only the best.
        keep_last_n: keep only the newest N checkpoints (plus the best one when tracking); default: all.
        keep_state_last_n: keep the resumable state (``deepspeed/``) only in the newest N checkpoints (plus the
            best one when tracking); every checkpoint keeps ``hf_model/`` and ``training_info.json``, so all
            of them can still be evaluated. Default: every state is kept. The remedy the disk check suggests.
        save_dtype: dtype of the ``hf_model/`` weights: ``auto`` (bfloat16 for a bf16 run, else float32),
            ``bfloat16`` or ``float32``.
        save_adapter: with ``model.lora.enabled``, also write ``adapter/`` (peft's own format) beside the merged
            ``hf_model/``, to load onto the base model with peft.
        background_save: copy what a save writes to host memory at the save step and write the files while
            training goes on (at most one save in flight); false writes them with training paused.
        disk_check: before step 1, compare the space the kept checkpoints will take with the free space at
            output_dir: ``error`` (stop if too little), ``warn`` or ``off``.
        on_nonfinite_loss: a NaN/infinite loss ``error`` (stop, naming the step and datasets) or ``skip_step``.
        evaluation: ``evaluation`` may also be nested here (as the original feature document writes it); it is merged over the
            top-level section.
        best_model_tracking: likewise for ``best_model_tracking``.
    """

    epochs: int = 1
    max_steps: int = -1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: float = 0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    save_steps: int = 500
    eval_steps: int = 500
    skip_evaluation: bool = False
    save_all_checkpoints: bool = False
    keep_last_n: int | None = None
    keep_state_last_n: int | None = None
    save_dtype: SaveDtype = "auto"
    save_adapter: bool = False
    background_save: bool = True
    disk_check: DiskCheck = "error"
    on_nonfinite_loss: OnNonFiniteLoss = "error"
    evaluation: EvaluationConfig | None = None
    best_model_tracking: BestModelTrackingConfig | None = None


@dataclass
class MonitorConfig:
    """The ``monitor:`` section: what is measured beside the loss (see :class:`qwen_cls.monitor.TrainingMonitor`).

    Args:
        system_every_n_steps: log ``system/*`` (GPU memory, NVML utilisation, host memory) every this many
            optimizer steps, a multiple of ``training.logging_steps``; default: every logging step.
        peak_tflops: the device's dense peak in TFLOP/s that ``perf/mfu`` divides by; default: looked up from
            the GPU's name (dense bf16). Where none is known (CPU, unlisted GPUs) ``perf/mfu`` is not logged.
        plots: loss, lr, gradient-norm and throughput PNGs in ``output_dir/plots``. ``true``: redrawn at each
            checkpoint (rank 0, in a low-priority process) and at the end; ``auto``: the same where the host
            has a core to spare for the redraw (any GPU run; a CPU-only run with more cores than its compute
            threads and DataLoader workers use), else drawn at the end only; ``false``: never.
    """

    system_every_n_steps: int | None = None
    peak_tflops: float | None = None
    plots: bool | Literal["auto"] = "auto"


@dataclass
class WandbConfig:
    """The ``wandb:`` section. The API key is read only from the environment or ``wandb login``; without
    one (or with ``WANDB_MODE=offline``) the run logs offline and ``wandb sync`` uploads it later.

    Args:
        enabled: log to W&B beside the local ``logs/version_N/metrics.csv`` (always written).
        project: W&B project.
        run_name: W&B run name; default: W&B's generated one.
        entity: W&B team or user; default: the key's default entity.
        tags: W&B run tags.
        notes: W&B run notes.
        log_dataset_metrics: also log training accuracy and loss per dataset.
        start_timeout: seconds W&B's server has to answer before the run starts; past them (no network, a
            proxy that swallows requests) the run logs offline and says so, rather than wait and fail.
    """

    enabled: bool = False
    project: str = "qwen-cls"
    run_name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    log_dataset_metrics: bool = False
    start_timeout: float = 5.0

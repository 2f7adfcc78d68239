"""The config sections (``loss``, ``datasets``, ``training``, ``evaluation``, ...) as typed dataclasses;
jsonargparse builds the CLI and YAML schema from them.

Each section checks its own values in ``__post_init__``, wherever it is built: from YAML or the command line,
in Python, or from a stored ``training_info.json`` (:meth:`RunConfig.from_mapping`). ``model:`` and ``data:`` are
the init arguments of the LightningModule and the LightningDataModule, which are handed the sections they
read. How ``training.skip_evaluation`` overrides the rest is in :mod:`qwen_cls.policy`. No torch here: the
tools read a run's config without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from qwen_cls.errors import ConfigError

# The choices of the config's string keys: jsonargparse refuses any other value when it parses the config,
# listing these, and `--help` shows them.
DiskCheck = Literal["error", "warn", "off"]
OnNonFiniteLoss = Literal["error", "skip_step"]
OnBadImage = Literal["error", "skip"]
SaveDtype = Literal["auto", "bfloat16", "float32"]
BestMode = Literal["max", "min"]
LossType = Literal["cross_entropy", "label_smoothing", "focal", "arcface", "symmetric_ce"]
LOSS_TYPES = get_args(LossType)

COSINE_SCALE = 30.0  # ArcFace's default scale: the loss's and the saved cosine head's


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {rule}, got {value}")


@dataclass
class LossConfig:
    """The ``loss:`` section.

    Args:
        type: cross_entropy, label_smoothing, focal, arcface or symmetric_ce.
        smoothing: label_smoothing: probability mass spread over the other valid classes, in [0, 1).
        gamma: focal: focusing exponent (>= 0); 0 is cross-entropy.
        alpha: focal: weight of the loss (> 0); symmetric_ce: weight of the cross-entropy term (>= 0).
        beta: symmetric_ce: weight of the reverse cross-entropy term (>= 0).
        margin: arcface: additive angular margin in radians, in [0, pi/2), applied in training only.
        scale: arcface: the cosine logits are multiplied by it (> 0).
        temperature: every loss divides the logits by it first (> 0).
    """

    type: LossType = "cross_entropy"
    smoothing: float = 0.1
    gamma: float = 2.0
    alpha: float = 1.0
    beta: float = 1.0
    margin: float = 0.2
    scale: float = COSINE_SCALE
    temperature: float = 1.0

    def __post_init__(self) -> None:
        # jsonargparse refuses an unknown type when it parses; this is for Python and stored configs
        if self.type not in LOSS_TYPES:
            raise ConfigError(f"loss.type: unknown {self.type!r}; choose one of {', '.join(LOSS_TYPES)}")
        focal = self.type == "focal"
        _require(self.temperature > 0, "loss.temperature", "> 0", self.temperature)
        _require(0.0 <= self.smoothing < 1.0, "loss.smoothing", "in [0, 1)", self.smoothing)
        _require(self.gamma >= 0, "loss.gamma", ">= 0", self.gamma)
        _require(
            self.alpha > 0 if focal else self.alpha >= 0,
            "loss.alpha",
            "> 0 for focal, >= 0 for symmetric_ce",
            self.alpha,
        )
        _require(self.beta >= 0, "loss.beta", ">= 0", self.beta)
        _require(0.0 <= self.margin < math.pi / 2, "loss.margin", "in [0, pi/2)", self.margin)
        _require(self.scale > 0, "loss.scale", "> 0", self.scale)
        if self.type == "symmetric_ce" and self.alpha == 0 and self.beta == 0:
            raise ConfigError("loss.alpha / loss.beta: symmetric_ce needs at least one of them > 0")


@dataclass
class DatasetConfig:
    """One dataset of ``datasets.dataset_configs``.

    Args:
        num_classes: labels of this dataset are 0 .. num_classes-1.
        description: a few words used in the prompt (``{description}`` in ``data.prompt_template``).
        eval_ratio: fraction of this dataset's validation rows used by the partial evaluation during training.
        class_names: the name of each label, in label order: a list, or a UTF-8 text file with one name a line
            (read once when the run starts; the run stores the list). They name the head's columns in
            ``hf_model/`` (``id2label``) and in the vLLM export, and the labels ``predict`` prints. Default: the
            label numbers.
    """

    num_classes: int
    description: str = ""
    eval_ratio: float = 1.0
    class_names: list[str] | str | None = None


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

    def __post_init__(self) -> None:
        """Values peft would accept and train badly with, or fail on late."""
        _require(self.r >= 1, "model.lora.r", ">= 1", self.r)
        _require(self.alpha > 0, "model.lora.alpha", "> 0", self.alpha)
        _require(0 <= self.dropout < 1, "model.lora.dropout", "in [0, 1)", self.dropout)


def _class_names(given: list[str] | str | None, num_classes: int, key: str) -> list[str] | None:
    """``class_names`` as a list (a file read), checked against ``num_classes``: one line for a wrong length, a
    repeated or an empty name."""
    if given is None:
        return None
    names = given
    if isinstance(given, str):
        path = Path(given).expanduser()
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        except FileNotFoundError:
            raise ConfigError(
                f"{key}: {given} not found (a list of names, or a text file with one a line)"
            ) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{key}: {given} is not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {given} ({e.strerror})") from None
        while names and not names[-1]:
            names.pop()  # a final newline, or blank lines at the end
    names = [str(name) for name in names]
    where = f" ({given})" if isinstance(given, str) else ""
    if len(names) != num_classes:
        raise ConfigError(f"{key}: {len(names)} names for num_classes {num_classes}{where}")
    empty = next((i for i, name in enumerate(names) if not name.strip()), None)
    if empty is not None:
        raise ConfigError(f"{key}: the name of label {empty} is empty{where}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{key}: {name!r} names labels {seen[name]} and {i}{where}")
        seen[name] = i
    return names


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

    def __post_init__(self) -> None:
        """Values a dataset's rows would meet only later: a label range of none, an evaluation share out of (0, 1]."""
        self.dataset_configs = {
            name: DatasetConfig(**ds) if isinstance(ds, Mapping) else ds
            for name, ds in self.dataset_configs.items()
        }
        for name, ds in self.dataset_configs.items():
            key = f"datasets.dataset_configs.{name}"
            _require(ds.num_classes >= 1, f"{key}.num_classes", ">= 1", ds.num_classes)
            _require(
                0 < ds.eval_ratio <= 1,
                f"{key}.eval_ratio",
                "in (0, 1] (a share of its validation rows)",
                ds.eval_ratio,
            )
            ds.class_names = _class_names(ds.class_names, ds.num_classes, f"{key}.class_names")

    @property
    def num_classes(self) -> list[int]:
        """Each dataset's label count, in the order of ``dataset_configs`` (the rows' dataset indices)."""
        return [ds.num_classes for ds in self.dataset_configs.values()]

    def names(self, dataset: str) -> list[str]:
        """A dataset's label names (its ``class_names``, else the label numbers)."""
        ds = self.dataset_configs[dataset]
        return list(ds.class_names) if ds.class_names else [str(i) for i in range(ds.num_classes)]

    def id2label(self, num_labels: int) -> dict[int, str]:
        """The head's column names: with one dataset its class names; with several, each column's
        ``dataset/name`` of every dataset that has it, joined by `` | `` (their labels share the columns)."""
        named = [name for name, ds in self.dataset_configs.items() if ds.class_names]
        if not named:
            return {i: str(i) for i in range(num_labels)}
        columns: dict[int, list[str]] = {i: [] for i in range(num_labels)}
        single = len(self.dataset_configs) == 1
        for name in self.dataset_configs:
            for i, label in enumerate(self.names(name)):
                columns[i].append(label if single else f"{name}/{label}")
        return {i: " | ".join(labels) or str(i) for i, labels in columns.items()}


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

    def __post_init__(self) -> None:
        """The mode; which metrics exist depends on the datasets, so the resolver checks the name."""
        if self.mode not in get_args(BestMode):
            raise ConfigError(f"best_model_tracking.mode: must be max or min, got {self.mode!r}")


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

    def __post_init__(self) -> None:
        """Values AdamW or the loop would take without complaint (or with a traceback) but that train nothing."""
        _require(self.epochs >= 1, "training.epochs", ">= 1", self.epochs)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"training.max_steps: {self.max_steps} trains nothing; use a positive number, or -1 for all epochs"
            )
        _require(self.lr > 0, "training.lr", "> 0", self.lr)
        _require(self.weight_decay >= 0, "training.weight_decay", ">= 0", self.weight_decay)
        _require(self.warmup_steps >= 0, "training.warmup_steps", ">= 0", self.warmup_steps)
        _require(
            self.max_grad_norm >= 0, "training.max_grad_norm", ">= 0 (0: no clipping)", self.max_grad_norm
        )
        for key in ("logging_steps", "save_steps", "eval_steps"):
            _require(getattr(self, key) >= 1, f"training.{key}", ">= 1", getattr(self, key))
        for key in ("keep_last_n", "keep_state_last_n"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"training.{key}", ">= 1", value)
        if isinstance(self.evaluation, Mapping):
            self.evaluation = EvaluationConfig(**self.evaluation)
        if isinstance(self.best_model_tracking, Mapping):
            self.best_model_tracking = BestModelTrackingConfig(**self.best_model_tracking)


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

    def __post_init__(self) -> None:
        """Each value alone; a multiple of training.logging_steps is checked where both are known (monitor)."""
        every = self.system_every_n_steps
        _require(every is None or every >= 1, "monitor.system_every_n_steps", ">= 1", every)
        _require(
            self.peak_tflops is None or self.peak_tflops > 0, "monitor.peak_tflops", "> 0", self.peak_tflops
        )


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

    def __post_init__(self) -> None:
        _require(self.start_timeout > 0, "wandb.start_timeout", "> 0 seconds", self.start_timeout)


SECTIONS = {
    "loss": LossConfig,
    "datasets": DatasetsConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
    "best_model_tracking": BestModelTrackingConfig,
    "wandb": WandbConfig,
    "monitor": MonitorConfig,
}

# Keys that configs stored before the sections were handed whole to the module and the data module held as
# copies (jsonargparse links); dropped when such a config is read, so the tools read old runs as new ones.
_FORMER_COPIES = {
    "model": {
        "loss",
        "dataset_configs",
        "enable_logits_masking",
        "lr",
        "weight_decay",
        "warmup_steps",
        "gradient_checkpointing",
        "on_nonfinite_loss",
        "log_dataset_metrics",
    },
    "data": {"dataset_configs"},
}


def without_former_copies(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config in today's shape (see ``_FORMER_COPIES``)."""
    return {
        name: {k: v for k, v in value.items() if k not in _FORMER_COPIES[name]}
        if name in _FORMER_COPIES and isinstance(value, Mapping)
        else value
        for name, value in config.items()
    }


@dataclass
class RunConfig:
    """A run's whole config, as ``training_info.json`` stores it, read back through the section classes (so
    it is checked as when the run started). ``model`` and ``data`` stay mappings: they are the init arguments of
    :class:`qwen_cls.model.QwenClassifier` and :class:`qwen_cls.data.QwenDataModule`, which check them."""

    model: dict[str, Any]
    data: dict[str, Any]
    loss: LossConfig
    datasets: DatasetsConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    best_model_tracking: BestModelTrackingConfig
    wandb: WandbConfig
    monitor: MonitorConfig
    trainer: dict[str, Any]

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], where: str = "config") -> RunConfig:
        """``where`` names the source in the one-line error of a key that no section has."""
        config = without_former_copies(config)
        sections = {}
        for name, section in SECTIONS.items():
            values = dict(config.get(name) or {})
            known = {f.name for f in fields(section)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"{name}.{unknown[0]}: not a key of the {name}: section ({where})")
            sections[name] = section(**values)
        plain = {name: dict(config.get(name) or {}) for name in ("model", "data", "trainer")}
        if "num_labels" not in plain["model"]:
            raise ConfigError(f"model.num_labels: missing ({where})")
        return cls(**plain, **sections)

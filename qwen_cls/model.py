"""The LightningModule that trains the classifier, and loading a Qwen-VL checkpoint (any supported family) into it.

The Hugging Face model itself (what ``hf_model/`` holds) is in :mod:`qwen_cls.modeling`, which needs no
Lightning.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict
from importlib.util import find_spec
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from transformers.optimization import get_cosine_schedule_with_warmup

from qwen_cls.config import DatasetsConfig, LoraSettings, LossConfig, TrainingConfig, WandbConfig
from qwen_cls.console import say
from qwen_cls.errors import CheckpointError, ConfigError, NonFiniteLossError
from qwen_cls.families import is_classifier
from qwen_cls.loading import (
    Attention,
    TorchDtype,
    choose_attention,
    load_classifier,
    load_dtype,
    qwen_model_type,
)
from qwen_cls.lora import adapted, apply_lora
from qwen_cls.losses import classification_loss, head_for, mask_logits
from qwen_cls.metrics import ClassificationMetrics, ClassScores
from qwen_cls.modeling import (
    MODEL_INPUTS,
    QwenVLForImageClassification,
    label_maps,
)
from qwen_cls.step_axis import step_metric
from qwen_cls.strategy import make_adamw, zero_stage_3

if TYPE_CHECKING:
    from qwen_cls.data import Batch


@functools.cache
def _say_once(message: str) -> None:
    say(message)


class QwenClassifier(L.LightningModule):
    """The ``model:`` section: what to load and how big the head is.

    Args:
        pretrained_name: a local model folder of a supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
            Qwen3.5; any size; its config.json says which), or a ``hf_model/`` saved by qwen-cls.
        num_labels: columns of the head; at least every dataset's ``num_classes``.
        torch_dtype: weight dtype: ``auto`` follows ``trainer.precision`` (fp32 unless ``bf16-true``/``16-true``).
        attn_implementation: ``auto`` (FlashAttention-2 when installed and the GPU supports it, else ``sdpa``),
            ``flash_attention_2``, ``sdpa`` or ``eager``; the choice is logged once.
        freeze_vision: keep the vision tower's weights fixed (only the language model and the head train).
        reinit_head: with a classifier trained by qwen-cls as ``pretrained_name`` (its ``hf_model/``), train a new
            head (``num_labels`` columns, as for a base model) on its backbone instead of its trained head: a
            new label set. Without it the trained head is loaded, and must have ``num_labels`` columns.
        head_bias: give a new linear head a bias (logits = W h + b). Off by default: vLLM serves only a bias-free
            head (``qwen-cls export --format vllm`` refuses one with a bias), as transformers' own sequence
            classifiers have (the tiny demo model learns a little slower without one: README, "Serve with vLLM").
        lora: low-rank adapters (peft) instead of a full fine-tune: ``enabled``, ``r``, ``alpha``, ``dropout``,
            ``target_modules``, ``vision``, ``modules_to_save`` (see :class:`qwen_cls.config.LoraSettings`).
        loss: the ``loss:`` section.
        datasets: the ``datasets:`` section (each dataset's label count; logits masking).
        training: the ``training:`` section (the optimizer, its schedule, gradient checkpointing, non-finite
            losses), as the resolver left it.
        log_dataset_metrics: ``wandb.log_dataset_metrics``: also log training accuracy and loss per dataset
            (``train/<dataset>_accuracy``, ``train/<dataset>_loss``).

    ``loss``, ``datasets``, ``training`` and ``log_dataset_metrics`` are not keys of the ``model:`` section: the
    CLI hands the sections over (see :data:`qwen_cls.train.SECTION_LINKS`); in Python, pass them.
    """

    def __init__(
        self,
        pretrained_name: str,
        num_labels: int,
        torch_dtype: TorchDtype = "auto",
        attn_implementation: Attention = "auto",
        freeze_vision: bool = False,
        reinit_head: bool = False,
        head_bias: bool = False,
        lora: LoraSettings | None = None,
        loss: LossConfig | None = None,
        datasets: DatasetsConfig | None = None,
        training: TrainingConfig | None = None,
        log_dataset_metrics: bool = WandbConfig.log_dataset_metrics,
    ):
        super().__init__()
        self.loss_config = loss or LossConfig()
        self.lora = lora or LoraSettings()
        if self.lora.enabled:
            self.strict_loading = False  # a LoRA checkpoint holds what trains; the frozen base is loaded anew
        self.datasets = datasets or DatasetsConfig()
        self.train_config = training or TrainingConfig()  # not `self.training`: nn.Module's train/eval flag
        # plain values only: a checkpoint pickles no class of ours (weights_only loads it), and the loggers
        # record the sections as mappings
        self.save_hyperparameters(
            {
                "pretrained_name": pretrained_name,
                "num_labels": num_labels,
                "torch_dtype": torch_dtype,
                "attn_implementation": attn_implementation,
                "freeze_vision": freeze_vision,
                "reinit_head": reinit_head,
                "head_bias": head_bias,
                "lora": asdict(self.lora),
                "loss": asdict(self.loss_config),
                "datasets": asdict(self.datasets),
                "training": asdict(self.train_config),
                "log_dataset_metrics": log_dataset_metrics,
            }
        )
        for name, ds in self.datasets.dataset_configs.items():
            if ds.num_classes > num_labels:
                raise ConfigError(
                    f"model.num_labels: {num_labels} is smaller than datasets.dataset_configs.{name}.num_classes "
                    f"({ds.num_classes})"
                )
        self.dataset_names = list(self.datasets.dataset_configs) or ["default"]
        classes = self.datasets.num_classes or [num_labels]
        self.register_buffer("dataset_num_classes", torch.tensor(classes), persistent=False)
        self.masking = self.datasets.enable_logits_masking and min(classes) < num_labels
        self.net: QwenVLForImageClassification | None = None
        self.val_metrics = ClassificationMetrics(self.dataset_names, num_labels)
        self.last_eval_metrics: dict[str, float] = {}
        self.last_eval_classes: dict[str, ClassScores] = {}  # per dataset, of the last evaluation
        self.last_eval_step = -1
        self.samples_seen = 0
        self.skipped_steps = 0
        self._skipped_images_before = 0  # from the checkpoint resumed
        self._new_step_state(torch.device("cpu"))
        self._positions: dict[int, tuple[int, int]] = {}  # step -> (epoch, batch) since the last check
        self._deepspeed_norm_step = -1  # DeepSpeed's optimizer step whose gradient norm was last logged

    def _new_step_state(self, device: torch.device) -> None:
        """What the training step keeps on the device, read at logging steps and saves (see training_step).
        Plain fp32 tensors, not buffers: a bf16 module (DeepSpeed bf16, bf16-true) would cast buffers, and a
        sum of losses in bf16 is off by ~1% after a few steps."""
        self._skipped_images = torch.zeros((), dtype=torch.long, device=device)
        # the sum of losses and the number of micro-batches since the last logging step, and since the last save
        self._loss_log = torch.zeros(2, device=device)
        self._loss_save = torch.zeros(2, device=device)
        self._bad_step = torch.tensor(-1, device=device)
        self._bad_loss = torch.tensor(0.0, device=device)
        self._bad_datasets = torch.zeros(len(self.dataset_names), dtype=torch.bool, device=device)

    def on_train_start(self) -> None:
        self._new_step_state(self.device)
        trainer = self.trainer
        total, step = (
            int(trainer.estimated_stepping_batches),
            trainer.global_step,
        )  # step: restored by a resume
        if 0 < total < step:  # the rows or the epochs shrank under it: the schedule would run past its end
            raise ConfigError(
                f"ckpt_path: the checkpoint is at step {step}, but this run's length is {total} steps "
                f"(training.epochs x {trainer.num_training_batches} batches an epoch, or training.max_steps); raise "
                "training.epochs or training.max_steps"
            )
        if 0 < total == step:
            say(f"nothing left to train: the checkpoint is at step {step}, this run's last")

    def configure_model(self) -> None:
        """Load weights lazily, once, so strategies (DeepSpeed ZeRO-3) can shape how the model is built."""
        if self.net is not None:
            return
        precision = self._trainer.precision if self._trainer is not None else None
        hp = self.hparams
        head = head_for(self.loss_config.type)
        dtype = load_dtype(hp.torch_dtype, precision)
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        attention = choose_attention(hp.attn_implementation, capability, find_spec("flash_attn") is not None)
        if hp.attn_implementation == "auto":
            _say_once(f"attention: {attention} (model.attn_implementation: auto, on {device.type})")
        if self._trainer is not None and zero_stage_3(self._trainer.strategy):
            # transformers builds and loads the weights partitioned (a 72B model never whole on one rank)
            # only while this object lives; it keeps a weak reference alone
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self._trainer.strategy.config)
        # the adapters' seed, before loading (which draws from the RNG under ZeRO-3 only), as the head's
        lora_seed = int(torch.randint(0, 2**31 - 1, ())) if self.lora.enabled else 0
        self.net = load_classifier(
            hp.pretrained_name,
            hp.num_labels,
            dtype,
            attention,
            head,
            self.loss_config.scale,
            hp.reinit_head,
            hp.head_bias,
        ).train()  # from_pretrained returns eval mode; Lightning switches to eval for validation itself
        # the columns' names as this run's datasets give them: hf_model/ and the vLLM export carry them
        for key, value in label_maps(self.datasets.id2label(hp.num_labels)).items():
            setattr(self.net.config, key, value)
        if self._trainer is not None and self._trainer.state.fn == "fit":
            if is_classifier(qwen_model_type(hp.pretrained_name)):
                _say_once(
                    f"model: a new head of {hp.num_labels} labels on the backbone of the classifier in {hp.pretrained_name}"
                    if hp.reinit_head
                    else f"model: the trained head of the classifier in {hp.pretrained_name} is loaded and trained "
                    "further (model.reinit_head: true starts a new one)"
                )
        if hp.freeze_vision:
            self.net.model.visual.requires_grad_(False)
        if self.train_config.gradient_checkpointing:
            self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora.enabled:
            if self.train_config.gradient_checkpointing:
                self.net.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
            # kept outside the module tree: its parameters are self.net's, which it wraps
            partitioned = self._trainer is not None and zero_stage_3(self._trainer.strategy)
            object.__setattr__(self, "peft_model", apply_lora(self.net, self.lora, lora_seed, partitioned))

    def on_fit_start(self) -> None:
        """Once per run: what trains."""
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.net.parameters() if p.requires_grad)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in self.net.parameters())
        if self.lora.enabled:
            how = f"LoRA r={self.lora.r} on {len(adapted(self.net))} projections, the head in full"
        else:
            how = "full fine-tune" + (", vision tower frozen" if self.hparams.freeze_vision else "")
        say(
            f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%; {how})"
        )
        trainer = self.trainer
        total_steps = int(trainer.estimated_stepping_batches)
        if 0 < total_steps < trainer.max_steps:
            say(
                f"training.max_steps: {trainer.max_steps}, but training.epochs: {trainer.max_epochs} ends the run at step "
                f"{total_steps} ({trainer.num_training_batches} batches an epoch); raise training.epochs to train longer"
            )

    def trainable_state_names(self) -> set[str]:
        """The checkpoint's ``state_dict`` entries of what trains (LoRA keeps only those; see on_save_checkpoint)."""
        return {f"net.{n}" for n, p in self.net.named_parameters() if p.requires_grad}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits

    def valid_classes(self, dataset_idx: torch.Tensor) -> torch.Tensor | None:
        """(batch, num_labels) mask of each row's own dataset's classes, or None when nothing is masked."""
        if not self.masking:
            return None
        columns = torch.arange(self.hparams.num_labels, device=dataset_idx.device)
        return columns[None, :] < self.dataset_num_classes[dataset_idx][:, None]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        """No host synchronisation and no collective outside logging steps: the loss tally, the non-finite
        watch and the skipped-image count stay on the device and are read once per logging step (and at each
        save). The one exception is ``on_nonfinite_loss: skip_step``, which must decide before backward."""
        logits = self(batch)
        valid = self.valid_classes(batch["dataset_idx"])
        loss = classification_loss(logits, batch["labels"], self.loss_config, valid)
        step = self.trainer.global_step + 1
        if self.train_config.on_nonfinite_loss == "skip_step" and not self._finite_on_every_rank(
            loss, batch, step
        ):
            return None  # Lightning skips backward and the optimizer step
        if self.train_config.on_nonfinite_loss == "error":
            self._watch_finite(loss.detach(), batch, step)
        if "skipped_images" in batch:
            self._skipped_images = self._skipped_images + batch["skipped_images"]
        if self.hparams.log_dataset_metrics:
            self._log_dataset_metrics(logits.detach(), batch, valid)
        self.samples_seen += batch["sample_lengths"].shape[0] * self.trainer.world_size  # a shape: no sync
        tally = torch.stack([loss.detach().float(), torch.ones_like(loss, dtype=torch.float)])
        self._loss_log += tally
        self._loss_save += tally
        if self.is_logging_step(step):  # where Lightning hands metrics to the loggers; a log costs ~0.1 ms
            self.log(
                "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True
            )
            self.log("train/epoch", float(self.current_epoch), on_step=True)
            # the x-axis (qwen_cls.step_axis): the optimizer step this batch completes
            self.log_dict(step_metric(step), on_step=True, on_epoch=False)
        return loss

    def is_logging_step(self, step: int) -> bool:
        return step % self.trainer.log_every_n_steps == 0 or step >= self.trainer.max_steps > 0

    def _watch_finite(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], step: int) -> None:
        """Remember, on the device, the first step whose loss was not finite and its datasets;
        :meth:`raise_if_nonfinite` reads it at logging steps and before every save."""
        bad = ~torch.isfinite(loss)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)
        seen = (
            batch["dataset_idx"][:, None] == torch.arange(len(self.dataset_names), device=loss.device)
        ).any(0)
        self._bad_datasets = torch.where(first, seen, self._bad_datasets)
        self._positions[step] = (self.current_epoch, self.trainer.fit_loop.epoch_loop.batch_idx)

    def raise_if_nonfinite(self) -> None:
        """One read (and one all-gather across ranks): stop, naming the first non-finite step, if any."""
        if self.train_config.on_nonfinite_loss != "error":
            return
        steps = self.trainer.strategy.all_gather(self._bad_step).reshape(-1).tolist()
        positions, self._positions = self._positions, {}
        bad = [s for s in steps if s >= 0]
        if not bad:
            return
        step = min(bad)
        epoch, batch_idx = positions.get(step, (self.current_epoch, "?"))
        if int(self._bad_step) == step:
            datasets = [
                n for n, seen in zip(self.dataset_names, self._bad_datasets.tolist(), strict=True) if seen
            ]
            what = f"the loss is {float(self._bad_loss)} on a batch of dataset(s) {', '.join(datasets)}"
        else:
            what = "the loss is not finite on another rank's batch"
        raise NonFiniteLossError(
            f"training step {step} (epoch {epoch}, batch {batch_idx}): {what}; lower training.lr or "
            "loss.temperature's divisor, check the data, or set training.on_nonfinite_loss: skip_step"
        )

    def _finite_on_every_rank(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], step: int) -> bool:
        """skip_step: a host read and one scalar all-reduce per step, the price of deciding before backward;
        all ranks agree, so a skip never leaves a rank waiting in backward."""
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return True
        datasets = sorted({self.dataset_names[i] for i in batch["dataset_idx"].tolist()})
        where = f"training step {step} (epoch {self.current_epoch}, batch {self.trainer.fit_loop.epoch_loop.batch_idx})"
        self.skipped_steps += 1
        rank_zero_warn(f"{where}: non-finite loss on dataset(s) {', '.join(datasets)}; step skipped")
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        return False

    @property
    def skipped_images(self) -> int:
        """Unreadable images left out with ``data.on_bad_image: skip`` (this rank); a host read."""
        return self._skipped_images_before + int(self._skipped_images)

    def take_loss(self, window: str) -> torch.Tensor | None:
        """The mean training loss over all ranks since this window (``log`` or ``save``) was last taken, or
        None without a finite loss in it; one all-reduce."""
        name = f"_loss_{window}"
        tally = self.trainer.strategy.reduce(getattr(self, name).clone(), reduce_op="sum")
        getattr(self, name).zero_()
        return tally[0] / tally[1] if float(tally[1]) > 0 else None

    def _log_dataset_metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], valid) -> None:
        losses = classification_loss(logits, batch["labels"], self.loss_config, valid, reduction="none")
        hits = (mask_logits(logits.float(), valid).argmax(-1) == batch["labels"]).float()
        for idx, name in enumerate(self.dataset_names):
            rows = batch["dataset_idx"] == idx
            if rows.any():
                n = int(rows.sum())
                self.log(f"train/{name}_accuracy", hits[rows].mean(), on_step=True, batch_size=n)
                self.log(f"train/{name}_loss", losses[rows].mean(), on_step=True, batch_size=n)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after all accumulated backward passes and before clipping: ``train/loss``
        is the mean over the step's micro-batches; on logging steps the global gradient norm (before
        clipping; it costs a pass over the gradients)."""
        strategy = self.trainer.strategy
        if (
            isinstance(strategy, DeepSpeedStrategy)
            and not strategy.deepspeed_engine.is_gradient_accumulation_boundary()
        ):
            return  # DeepSpeed accumulates itself: Lightning calls this hook for every micro-batch
        if not self.is_logging_step(self.trainer.global_step + 1):
            return
        mean = self.take_loss("log")  # the mean over the window's micro-batches on all ranks
        if mean is not None:
            self.log("train/loss", mean, prog_bar=True, on_step=True)
        if int(self._skipped_images):
            self.log("train/skipped_images", float(self.skipped_images), on_step=True)
        norms = [p.grad.detach().float().norm() for p in self.net.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), on_step=True)

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """On logging steps: stop if a loss was not finite; under DeepSpeed, where ``p.grad`` is None
        (gradients live in its partitioned buffers), log the global norm before clipping of its last step."""
        if self.is_logging_step(self.trainer.global_step):
            self.raise_if_nonfinite()
        strategy = self.trainer.strategy
        if (
            not isinstance(strategy, DeepSpeedStrategy)
            or self.trainer.global_step % self.trainer.log_every_n_steps
        ):
            return
        if strategy.deepspeed_engine.global_steps == self._deepspeed_norm_step:
            return  # a micro-batch that did not end an optimizer step
        self._deepspeed_norm_step = strategy.deepspeed_engine.global_steps
        norm = strategy.deepspeed_engine.get_global_grad_norm()
        if norm is not None:
            self.log("train/grad_norm", float(norm), on_step=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        valid = self.valid_classes(batch["dataset_idx"])
        logits = mask_logits(self(batch).float(), valid)
        losses = classification_loss(logits, batch["labels"], self.loss_config, valid, "none", training=False)
        counted = ~batch["filler"] if "filler" in batch else None
        self.val_metrics.update(logits, batch["labels"], batch["dataset_idx"], losses, counted)

    def on_validation_epoch_end(self) -> None:
        self.last_eval_metrics = self.val_metrics.compute()
        self.last_eval_classes = self.val_metrics.last_classes
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.last_eval_step = self.trainer.global_step
            metrics = {f"eval/{k}": float(v) for k, v in self.last_eval_metrics.items()}
            if self.trainer.state.fn == "fit":  # logged against the optimizer step it evaluates
                metrics.update(step_metric(self.trainer.global_step))
            self.log_dict(metrics, sync_dist=False)

    def on_train_end(self) -> None:
        if self.skipped_images:
            rank_zero_warn(
                f"{self.skipped_images} unreadable images were skipped on rank 0 (data.on_bad_image: skip)"
            )

    def configure_optimizers(self):
        hp = self.train_config
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        # a ZeRO-3 partition is an empty placeholder; its real shape is ds_shape
        decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, hp.weight_decay), (no_decay, 0.0))
            if params  # LoRA with a bias-free head trains matrices only: DeepSpeed drops an empty group
        ]
        optimizer = make_adamw(groups, hp.lr, self._trainer.strategy if self._trainer is not None else None)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("training.epochs / training.max_steps: the run length must be finite")
        warmup = int(hp.warmup_steps * total) if hp.warmup_steps < 1 else int(hp.warmup_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if (
            self.lora.enabled and "state_dict" in checkpoint
        ):  # DeepSpeed keeps module weights in its own files
            keep = self.trainable_state_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["qwen_cls"] = {
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "skipped_images": self.skipped_images,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lora.enabled and "state_dict" in checkpoint:
            missing = sorted(self.trainable_state_names() - set(checkpoint["state_dict"]))
            if missing:
                raise CheckpointError(
                    f"ckpt_path: the checkpoint lacks {len(missing)} of the LoRA run's trained weights (e.g. "
                    f"{missing[0]}); was it written with the same model.lora settings?"
                )
        state = checkpoint.get("qwen_cls", {})
        self.samples_seen = state.get("samples_seen", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self._skipped_images_before = state.get("skipped_images", 0)
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])

"""Run monitoring helpers shared by training and evaluation."""

from __future__ import annotations

import datetime
import logging
import netrc
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from qwen_cls import plots
from qwen_cls.console import tell
from qwen_cls.errors import ConfigError


@rank_zero_only
def say(message: str) -> None:
    """One line to the user on stdout, from rank 0 only."""
    tell(message)


def quiet_library_chatter() -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards") and no Lightning
    advertisement in our output; warnings and errors still come through."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # DeepSpeed calls torch.distributed's old collective names, once per call; Lightning points ZeRO-3 users
    # to a single-file conversion, where hf_model/ and `qwen-cls export` are the answer here
    warnings.filterwarnings(
        "ignore", r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated", FutureWarning
    )
    warnings.filterwarnings("ignore", "When saving the DeepSpeed Stage 3 checkpoint")
    # our datamodule saves and restores the position in the epoch (ResumableSampler), which Lightning cannot see
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in lightning_info.filters):
        lightning_info.addFilter(_NoAdverts())


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def wandb_online() -> bool:
    """Whether W&B can log online: a key in the environment or stored by ``wandb login`` (netrc), and
    ``WANDB_MODE`` not ``offline``. The key itself is never read into qwen-cls."""
    if os.environ.get("WANDB_MODE") == "offline":
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


SHOWN = {"train/loss": "loss", "train/lr": "lr", "perf/samples_per_second": "samples/s"}


class LogLineProgress(ProgressBar):
    """Progress for logs (not a terminal): one plain line every ``every`` steps, no control characters.

    ``step 120/500 (24%) | epoch 0 | loss 1.234 | lr 0.0019 | samples/s 231 | 7.1 steps/s | ETA 0:00:54``
    """

    def __init__(self, every: int = 10):
        super().__init__()
        self.every = max(1, every)
        self._enabled = True
        self._started = 0.0
        self._first_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started, self._first_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if not self._enabled or not trainer.is_global_zero or (step % self.every and step != total):
            return
        rate = (step - self._first_step) / max(time.monotonic() - self._started, 1e-9)
        eta = datetime.timedelta(seconds=round((total - step) / rate)) if rate > 0 else "?"
        metrics = trainer.callback_metrics
        shown = " | ".join(f"{name} {float(metrics[k]):.4g}" for k, name in SHOWN.items() if k in metrics)
        print(
            f"step {step}/{total} ({100 * step // max(total, 1)}%) | epoch {trainer.current_epoch} | {shown} | "
            f"{rate:.2f} steps/s | ETA {eta}",
            flush=True,
        )


# Dense bf16 peak per device in TFLOP/s (vendor datasheets, no sparsity); the first matching name wins
PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h800", 989.0),
    ("h20", 148.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("rtx 4090", 165.0),
)


def device_peak_flops(device: torch.device, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """The device's dense peak in FLOP/s and where the number came from; ``None`` where no peak is known."""
    if peak_tflops:
        return peak_tflops * 1e12, "monitor.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}; set monitor.peak_tflops"
    name = torch.cuda.get_device_name(device)
    peak = peak_for_name(name)
    return peak, f"{name}, dense bf16" if peak else f"no peak known for {name}; set monitor.peak_tflops"


def describe_device(device: torch.device) -> str:
    """``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: x86_64, 2 threads``: what a report says the run ran on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.machine()}, {torch.get_num_threads()} threads"


def peak_for_name(name: str) -> float | None:
    """Dense bf16 FLOP/s of a GPU from its CUDA device name, or ``None`` when the table lacks it."""
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name.lower()), None)


def _window_squares(n: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of squared window lengths when ``n`` positions are cut into windows of ``window`` (last partial)."""
    return (n // window) * window**2 + (n % window) ** 2


def vision_flops(vc, grid_thw: torch.Tensor) -> torch.Tensor:
    """Forward FLOPs of the Qwen2.5-VL vision tower on images with (t, h, w) patch grids: patch embedding,
    per-patch projections and MLPs, windowed attention (full attention in ``fullatt_block_indexes``), merger."""
    h, m = vc.hidden_size, vc.spatial_merge_size
    t, gh, gw = grid_thw.to(torch.float64).unbind(-1)
    patches = (t * gh * gw).sum()
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    linear = 2 * patches * (patch_in * h + vc.depth * (4 * h * h + 3 * h * vc.intermediate_size))
    merged_h = h * m * m
    merger = 2 * (patches / m**2) * (merged_h * merged_h + merged_h * vc.out_hidden_size)
    window = vc.window_size // m // vc.patch_size  # in merged tokens
    window_sq = (t * m**4 * _window_squares(gh / m, window) * _window_squares(gw / m, window)).sum()
    full_sq = (t * (gh * gw) ** 2).sum()  # full attention runs per frame
    full_layers = len(vc.fullatt_block_indexes)
    attention = 4 * h * ((vc.depth - full_layers) * window_sq + full_layers * full_sq)
    return linear + merger + attention


def text_flops(tc, seq_lens: torch.Tensor) -> torch.Tensor:
    """Forward FLOPs of the language model on sequences of the given real lengths (no LM head)."""
    h, layers = tc.hidden_size, tc.num_hidden_layers
    kv = tc.num_key_value_heads * (h // tc.num_attention_heads)
    lens = seq_lens.to(torch.float64)
    per_token = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * tc.intermediate_size)
    return per_token * lens.sum() + 4 * layers * h * (lens**2).sum()


def forward_flops(config, seq_lens: torch.Tensor, grid_thw: torch.Tensor | None) -> torch.Tensor:
    """Forward FLOPs of the classifier on sequences as they really are: their images' patch grids, their
    real lengths (visual + text tokens, no padding), the pooled head. A tensor on the inputs' device, so
    counting never waits for the accelerator."""
    hidden = config.text_config.hidden_size
    flops = text_flops(config.text_config, seq_lens) + 2 * seq_lens.numel() * hidden * config.num_labels
    if grid_thw is not None and grid_thw.numel():
        flops = flops + vision_flops(config.vision_config, grid_thw)
    return flops


class _FetchClock(Profiler):
    """Wraps the trainer's profiler to time the training dataloader's ``next()`` (Lightning profiles each
    fetch as ``train_dataloader_next``); everything else goes to the wrapped profiler."""

    def __init__(self, inner: Profiler):
        super().__init__()
        self.inner = inner
        self.seconds = 0.0
        self._started = 0.0

    def start(self, action_name: str) -> None:
        if action_name.endswith("train_dataloader_next"):
            self._started = time.perf_counter()
        self.inner.start(action_name)

    def stop(self, action_name: str) -> None:
        self.inner.stop(action_name)
        if action_name.endswith("train_dataloader_next"):
            self.seconds += time.perf_counter() - self._started

    def summary(self) -> str:
        return self.inner.summary()

    def describe(self) -> None:
        self.inner.describe()

    def setup(self, *args, **kwargs) -> None:
        self.inner.setup(*args, **kwargs)

    def teardown(self, stage) -> None:
        self.inner.teardown(stage)


class TrainingMonitor(Callback):
    """``perf/*`` at every logging step and ``system/*`` at ``monitor.system_every_n_steps``.

    A window runs from one logging step to the next, counting all ranks: samples, real tokens and the
    analytical FLOPs of what was processed (:func:`forward_flops` x3 for forward + backward; x4 with
    activation recomputation, reported as ``perf/hfu``). Time spent in validation is left out of the
    window; checkpoint saving is part of it. ``perf/mfu`` needs the device's peak (:func:`device_peak_flops`).
    """

    def __init__(
        self,
        logging_steps: int,
        system_every_n_steps: int | None = None,
        peak_tflops=None,
        recompute: bool = False,
    ):
        self.logging_steps = max(1, logging_steps)
        self.system_every = system_every_n_steps or self.logging_steps
        if self.system_every <= 0 or self.system_every % self.logging_steps:
            # Lightning hands metrics to the loggers on logging steps only
            raise ConfigError(
                f"monitor.system_every_n_steps: {system_every_n_steps} must be a positive multiple of "
                f"training.logging_steps ({logging_steps})"
            )
        self.peak_tflops = peak_tflops
        self.recompute = recompute
        self.peak: float | None = None
        self.clock: _FetchClock | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not isinstance(trainer.profiler, _FetchClock):
            trainer.profiler = self.clock = _FetchClock(trainer.profiler)

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak, source = device_peak_flops(pl_module.device, self.peak_tflops)
        peak = (
            f"{self.peak / 1e12:.0f} TFLOP/s per device ({source})" if self.peak else f"not logged: {source}"
        )
        say(f"MFU: {peak}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):  # one x-axis for every metric: the optimizer step
                    for prefix in ("train", "perf", "system", "eval"):
                        logger.experiment.define_metric(f"{prefix}/*", step_metric="trainer/global_step")
        self._last_step = trainer.global_step
        self._open_window()

    def _open_window(self) -> None:
        self._window_start = time.perf_counter()
        self._excluded = 0.0
        self._fetch_start = self.clock.seconds if self.clock else 0.0
        self._steps = 0
        self._lengths: list[
            torch.Tensor
        ] = []  # this rank's real sequence lengths in the window, on the device
        self._grids: list[torch.Tensor] = []  # and its images' patch grids

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._excluded += time.perf_counter() - self._validation_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._lengths.append(batch["attention_mask"].sum(-1))  # counted once per window, in _perf
        if "image_grid_thw" in batch:
            self._grids.append(batch["image_grid_thw"])
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: the optimizer step is not done yet
        self._steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        if trainer.global_step % self.system_every == 0:
            pl_module.log_dict(system_metrics(pl_module.device), on_step=True, on_epoch=False)
        if trainer.global_step % self.logging_steps == 0 or trainer.global_step >= trainer.max_steps > 0:
            pl_module.log_dict(self._perf(trainer), on_step=True, on_epoch=False)
            self._open_window()

    def _perf(self, trainer) -> dict[str, float]:
        seconds = max(time.perf_counter() - self._window_start - self._excluded, 1e-9)
        lengths = torch.cat(self._lengths)
        flops = forward_flops(
            trainer.lightning_module.net.config, lengths, torch.cat(self._grids) if self._grids else None
        )
        counts = torch.stack([torch.tensor(float(lengths.numel()), device=lengths.device, dtype=torch.float64),
                              lengths.sum().to(torch.float64), flops.to(torch.float64)])  # fmt: skip
        samples, tokens, flops = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        model_flops = 3 * flops / seconds / trainer.world_size  # per device
        metrics = {
            "perf/samples_per_second": samples / seconds,
            "perf/tokens_per_second": tokens / seconds,
            "perf/step_time": seconds / self._steps,
            "perf/data_wait_fraction": min(1.0, (self.clock.seconds - self._fetch_start) / seconds),
            "perf/tflops": model_flops / 1e12,
        }
        if self.peak:
            metrics["perf/mfu"] = model_flops / self.peak
            metrics["perf/hfu"] = model_flops * (4 / 3 if self.recompute else 1) / self.peak
        return metrics


def system_metrics(device: torch.device) -> dict[str, float]:
    """Memory of this process (host, and the GPU's as PyTorch's allocator sees it) and GPU utilisation via
    NVML when it is available."""
    gib = 2**30
    metrics = {"system/host_memory_rss_gb": psutil.Process().memory_info().rss / gib}
    if device.type == "cuda":
        metrics["system/gpu_memory_allocated_gb"] = torch.cuda.memory_allocated(device) / gib
        metrics["system/gpu_memory_reserved_gb"] = torch.cuda.memory_reserved(device) / gib
        metrics["system/gpu_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / gib
        try:
            metrics["system/gpu_utilization"] = float(torch.cuda.utilization(device))
        except Exception:  # no NVML library or driver support: memory is still logged
            pass
    return metrics


class RunPlots(Callback):
    """Redraw ``output_dir/plots`` at each checkpoint, on rank 0, in a separate low-priority process
    (``nice 19``: on a busy machine training keeps its cores, and no interpreter lock is shared), so
    training never waits; a redraw asked for while one runs is folded into the next. Once more, in this
    process, at the end."""

    def __init__(self, output_dir: str | Path, run_name: str | None = None):
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self._proc: subprocess.Popen | None = None
        self._errors = None
        self._pending = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # the log on disk reaches this checkpoint, even if the run is killed
            logger.save()
        if self._busy():
            self._pending = True
            return
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending and trainer.is_global_zero and not self._busy():
            self._start()

    def _busy(self) -> bool:
        if self._proc is None or self._proc.poll() is None:
            return self._proc is not None
        if self._proc.returncode:  # say why once, then go on training
            self._errors.seek(0)
            last = (self._errors.read().decode(errors="replace").strip().splitlines() or ["?"])[-1]
            rank_zero_warn(f"plots in {self.output_dir / plots.PLOTS_DIR} not redrawn: {last}")
        self._errors.close()
        self._proc = None
        return False

    def _start(self) -> None:
        self._pending = False
        self._errors = tempfile.TemporaryFile()
        command = [sys.executable, plots.__file__, str(self.output_dir)]  # no torch import: light
        self._proc = subprocess.Popen(
            command + (["--run_name", self.run_name] if self.run_name else []),
            stdout=subprocess.DEVNULL,
            stderr=self._errors,
            preexec_fn=(lambda: os.nice(19)) if hasattr(os, "nice") else None,
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self._proc is not None:
            self._proc.wait()
            self._busy()
        for logger in trainer.loggers:
            logger.save()
        try:
            plots.plot_run(self.output_dir, self.run_name)
        except Exception as e:  # a plot is never worth a training run
            rank_zero_warn(f"plots in {self.output_dir / plots.PLOTS_DIR} not drawn: {type(e).__name__}: {e}")

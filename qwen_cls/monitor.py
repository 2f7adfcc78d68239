"""The training callbacks that watch a run: throughput, FLOPs and MFU (:mod:`qwen_cls.flops`), system metrics,
the log-line progress bar, the plots process; and whether W&B can log online."""

from __future__ import annotations

import datetime
import netrc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.utilities import rank_zero_warn

from qwen_cls import plots
from qwen_cls.console import say
from qwen_cls.errors import ConfigError
from qwen_cls.flops import device_peak_flops, forward_flops_by_part, pass_factors
from qwen_cls.step_axis import define_wandb_axis


def wandb_online() -> bool:
    """Whether W&B can log online: a key in the environment or stored by ``wandb login`` (netrc), and
    ``WANDB_MODE`` not ``offline``. The key itself is never read into qwen-cls."""
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_unreachable(timeout: float) -> str | None:
    """Why W&B's server cannot be reached within ``timeout`` seconds, or None when it answers (any HTTP status
    counts: the server is there). wandb itself waits ~2 minutes on a network that swallows its requests, then
    fails the run with a traceback; this asks once, briefly, before a run depends on it."""
    import urllib.error
    import urllib.request

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        return f"{base} did not answer within {timeout:g} s ({reason})"
    return None


def wandb_mode(timeout: float) -> str:
    """``online`` or ``offline`` for a W&B run about to start; going offline is said in one line."""
    if not wandb_online():
        mode = os.environ.get("WANDB_MODE")
        why = f"WANDB_MODE={mode}" if mode else "no API key (WANDB_API_KEY or `wandb login`)"
        say(f"W&B: {why}, logging offline; `wandb sync` uploads later")
        return "offline"
    problem = wandb_unreachable(timeout)
    if problem:
        say(f"W&B: {problem}; logging offline, `wandb sync` uploads later (wandb.start_timeout)")
        return "offline"
    return "online"


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
    analytical FLOPs of what was processed (forward x3 for forward + backward where every weight trains,
    fewer for frozen weights and LoRA: :func:`qwen_cls.flops.pass_factors`; one forward more with activation
    recomputation, reported as ``perf/hfu``). Time spent in validation is left out of the
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
        self.factors = pass_factors(pl_module.net)
        self.peak, source = device_peak_flops(pl_module.device, self.peak_tflops)
        peak = (
            f"{self.peak / 1e12:.0f} TFLOP/s per device ({source})" if self.peak else f"not logged: {source}"
        )
        say(f"MFU: {peak}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):  # one x-axis for every metric: the optimizer step
                    define_wandb_axis(logger.experiment)
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
        self._lengths.append(batch["sample_lengths"])  # counted once per window, in _perf
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
        text, vision = forward_flops_by_part(
            trainer.lightning_module.net.config, lengths, torch.cat(self._grids) if self._grids else None
        )
        trained = self.factors[0] * text + self.factors[1] * vision
        counts = torch.stack([torch.tensor(float(lengths.numel()), device=lengths.device, dtype=torch.float64),
                              lengths.sum().to(torch.float64), torch.as_tensor(trained, dtype=torch.float64),
                              torch.as_tensor(text + vision, dtype=torch.float64)])  # fmt: skip
        samples, tokens, trained, forward = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        model_flops = trained / seconds / trainer.world_size  # per device
        metrics = {
            "perf/samples_per_second": samples / seconds,
            "perf/tokens_per_second": tokens / seconds,
            "perf/step_time": seconds / self._steps,
            "perf/data_wait_fraction": min(1.0, (self.clock.seconds - self._fetch_start) / seconds),
            "perf/tflops": model_flops / 1e12,
        }
        if self.peak:
            metrics["perf/mfu"] = model_flops / self.peak
            recomputed = forward / seconds / trainer.world_size if self.recompute else 0.0
            metrics["perf/hfu"] = (model_flops + recomputed) / self.peak
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


def redraw_at_checkpoints(
    setting: bool | str, cuda: bool, cpus: int, processes: int, threads: int, workers: int
) -> bool:
    """``monitor.plots``: whether plots are redrawn at each checkpoint (else at the end only). ``auto`` redraws
    where a core is free for it: on a GPU run the compute threads wait on the device; on a CPU-only run,
    when the node has more cores than its processes' compute threads and DataLoader workers. Measured on 2
    cores both taken by training: a redraw per checkpoint slowed training ~5% even at ``nice 19`` (a
    preempted thread stalls its whole OpenMP team)."""
    if setting != "auto":
        return bool(setting)
    return cuda or cpus > processes * (threads + workers)


class RunPlots(Callback):
    """Draw ``output_dir/plots`` on rank 0: at each checkpoint (``at_checkpoints``) in a separate low-priority
    process (``nice 19``: on a busy machine training keeps its cores, and no interpreter lock is shared), so
    training never waits, a redraw asked for while one runs folded into the next; and at the end, in this
    process, unless the last redraw already drew the final log."""

    def __init__(
        self, output_dir: str | Path, run_name: str | None = None, at_checkpoints: bool | str = True
    ):
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.setting = at_checkpoints
        self.at_checkpoints = at_checkpoints is True
        self._proc: subprocess.Popen | None = None
        self._errors = None
        self._pending = False
        self._drawn: tuple | None = None  # the metrics files (names and sizes) the last redraw read

    def setup(self, trainer, pl_module, stage: str) -> None:
        cuda = trainer.strategy.root_device.type == "cuda"
        workers = trainer.datamodule.workers() if hasattr(trainer.datamodule, "workers") else 0
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.at_checkpoints = redraw_at_checkpoints(
            self.setting, cuda, cpus, trainer.num_devices, torch.get_num_threads(), workers
        )
        if self.setting == "auto" and not self.at_checkpoints:
            say(
                f"plots: drawn at the end only (monitor.plots: auto; training's {torch.get_num_threads()} compute "
                f"threads and {workers} DataLoader worker{'s' * (workers != 1)} take the {cpus} cores; true redraws at each "
                "checkpoint)"
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # the log on disk reaches this checkpoint, even if the run is killed
            logger.save()
        if not self.at_checkpoints:
            return
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
            self._drawn = None
        self._errors.close()
        self._proc = None
        return False

    def _logs(self) -> tuple:
        return tuple((str(p), p.stat().st_size) for p in sorted(self.output_dir.glob(plots.LOG_GLOB)))

    def _start(self) -> None:
        self._pending = False
        self._errors = tempfile.TemporaryFile()
        self._drawn = self._logs()
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
        if self._drawn is not None and not self._pending and self._drawn == self._logs():
            return  # the redraw started at the final save drew this log
        try:
            plots.plot_run(self.output_dir, self.run_name)
        except Exception as e:  # a plot is never worth a training run
            rank_zero_warn(f"plots in {self.output_dir / plots.PLOTS_DIR} not drawn: {type(e).__name__}: {e}")

"""How a checkpoint's files reach the disk: at once, or copied to host memory at the save step and written
by one background thread per rank while training goes on.

The strategy's own writers are reused, only deferred: Lightning's ``TorchCheckpointIO`` (one device, DDP)
and DeepSpeed's ``TorchCheckpointEngine`` (its sharded engine state) hand each file to :class:`SaveFiles`,
which either writes it now or keeps a host copy of every tensor in it and the writer to call later. Lightning's
``AsyncCheckpointIO`` clones on the device (a second copy of the optimizer state in GPU memory) and does not
cover DeepSpeed; DeepSpeed's decoupled engine needs its compiled DeepNVMe op. A host copy costs a
device-to-host transfer at the save step and host memory until the files are written.

Ranks finish their files at different times and must not meet in a collective from a background thread, so
each rank drops a marker file in the checkpoint's temporary folder when its files are written (or failed), and
global rank 0 renames the folder into place once every rank's marker is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from qwen_cls.errors import CheckpointError
from qwen_cls.lora import is_lora_param

RANK_WAIT_S = 1800.0  # how long global rank 0 waits for the other ranks' files of a save


def host_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A point-in-time copy in host memory (a background write reads it while training changes the original);
    floating-point tensors in ``dtype`` when given."""
    cast = dtype if dtype is not None and tensor.is_floating_point() else None
    return tensor.detach().to("cpu", dtype=cast, copy=True)


class SaveFiles:
    """The strategy's checkpoint files of one save: written when handed over, or, inside :meth:`collect`, kept
    as host copies with the writer to call later.

    The host tensors of one save are reused by the next (whose snapshot is taken only once the previous write
    is finished): fresh host memory would be page-faulted and zero-filled at every save, and glibc maps every
    allocation over 32 MB anew (DeepSpeed's flat buffers are far larger). The price: one save's host copy stays
    allocated between saves."""

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] | None = None
        self._in_use: list[torch.Tensor] = []  # the host tensors of the latest snapshot
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def save(self, write: Callable[[Any, str], None], state: Any, path: str) -> None:
        if self._pending is None:
            write(state, path)
        else:
            self._pending.append(partial(write, apply_to_collection(state, torch.Tensor, self.copy), path))

    def copy(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:func:`host_copy` into a host tensor of the previous snapshot when one of that shape and dtype is free."""
        dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        free = self._free.get((tuple(tensor.shape), dtype))
        if not free:
            self._in_use.append(host_copy(tensor, dtype))
        else:
            self._in_use.append(free.pop().copy_(tensor.detach()))
        return self._in_use[-1]

    @contextlib.contextmanager
    def collect(self, defer: bool) -> Iterator[list[Callable[[], None]]]:
        """The writes of the block, deferred (``defer``) or already done (an empty list). A block must start
        after the previous snapshot's files are written: it reuses that snapshot's host tensors."""
        pending: list[Callable[[], None]] = []
        for tensor in self._in_use:
            self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)
        self._in_use = []
        self._pending = pending if defer else None
        try:
            yield pending
        finally:
            self._pending = None

    def release(self) -> None:
        """Host tensors the latest snapshot did not reuse (shapes that changed) are let go."""
        self._free = {}


class HostCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file (one device, DDP) through :class:`SaveFiles`."""

    def __init__(self, files: SaveFiles):
        super().__init__()
        self.files = files

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.files.save(partial(super().save_checkpoint, storage_options=storage_options), checkpoint, path)


def use_host_checkpoint_engine(engine: Any, files: SaveFiles) -> None:
    """DeepSpeed's engine state files (every rank's shards) through :class:`SaveFiles`; loading is unchanged."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class HostCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict: Any, path: str) -> None:
            files.save(partial(TorchCheckpointEngine.save, self), state_dict, path)

    engine.checkpoint_engine = HostCheckpointEngine(engine._config)


def mark_done(folder: Path, rank: int, failure: str | None = None) -> None:
    """This rank's files of the save in ``folder`` are written (or could not be: ``failure``)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f".rank-{rank:05d}.{'failed' if failure else 'done'}"
    (folder / name).write_text(failure or "")


def wait_for_ranks(folder: Path, world_size: int, timeout: float = RANK_WAIT_S) -> None:
    """Until every rank has marked its files of the save in ``folder`` written; then the markers go."""
    deadline = time.monotonic() + timeout
    while True:
        failed = sorted(folder.glob(".rank-*.failed"))
        if failed:
            raise CheckpointError(
                f"rank {int(failed[0].name[6:11])} could not write: {failed[0].read_text()}"
            )
        done = list(folder.glob(".rank-*.done"))
        if len(done) >= world_size:
            for marker in done:
                marker.unlink()
            return
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{len(done)} of {world_size} ranks wrote their files within {timeout:.0f} s"
            )
        time.sleep(0.05)


def lower_priority() -> None:
    """The writing thread yields the CPU to the training step and the data loading: Linux nice values are per
    thread, so +10 applies to this one only (elsewhere, nothing changes)."""
    with contextlib.suppress(OSError, AttributeError):
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + 10))


class BackgroundWriter:
    """One thread that writes checkpoints, at a lower CPU priority; at most one save in flight."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: tuple[str, Future] | None = None

    def submit(self, name: str, job: Callable[[], None]) -> None:
        if self._in_flight is not None:
            raise RuntimeError("a checkpoint write is still in flight; wait() for it first")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="qwen-cls-save", initializer=lower_priority
            )
        self._in_flight = (name, self._executor.submit(job))

    def wait(self) -> tuple[str | None, BaseException | None]:
        """The name of the save that was in flight (None if none) and its error, once it is written."""
        if self._in_flight is None:
            return None, None
        (name, future), self._in_flight = self._in_flight, None
        try:
            future.result()
        except BaseException as error:
            return name, error
        return name, None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def checkpoint_bytes(net: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Estimated bytes of a checkpoint's ``hf_model/`` (weights in ``dtype``, default their own) and of its
    resumable state (weights, AdamW's two fp32 moments, an fp32 master copy when the weights are not fp32).
    Under DeepSpeed the state is split into one shard per rank; the total in output_dir is the same. With
    LoRA, ``hf_model/`` holds the merged model (no adapters) and the state only what trains."""

    def numel(p: torch.Tensor) -> int:  # a ZeRO-3 partition's placeholder is empty; ds_numel is the whole
        return getattr(p, "ds_numel", p.numel())

    named = list(net.named_parameters())
    lora = any(is_lora_param(n) for n, _ in named)
    merged = [p for n, p in named if not is_lora_param(n)]
    hf = sum(numel(p) * (p.element_size() if dtype is None else dtype.itemsize) for p in merged)
    trainable = [p for _, p in named if p.requires_grad]
    weights = sum(numel(p) * p.element_size() for p in (trainable if lora else [p for _, p in named]))
    optimizer = sum(numel(p) * (8 if p.dtype == torch.float32 else 12) for p in trainable)
    return hf, weights + optimizer


def write_hf_model(path: Path, net: Any, weights: dict[str, torch.Tensor] | None, dtype, processor) -> None:
    """``save_pretrained`` of the classifier (with ``weights`` when given) and of the processor."""
    net.save_pretrained(path, state_dict=weights)
    if dtype is not None:  # save_pretrained records the module's dtype; the weights written are in this one
        config = json.loads((path / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(path)

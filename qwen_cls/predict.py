"""Predictions from a trained checkpoint: :class:`Predictor` for Python, ``qwen-cls predict`` for files.

The prompt, processor settings and logits masking come from the checkpoint's training config, and the
module is loaded the way ``qwen-cls evaluate`` loads it, so a prediction is what evaluation scored.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from qwen_cls.console import quiet_library_chatter, say
from qwen_cls.data import load_image
from qwen_cls.errors import ConfigError, DataError
from qwen_cls.evaluation import _processor_path, load_module, make_datamodule, read_config, resolve_checkpoint
from qwen_cls.images import to_rgb
from qwen_cls.losses import mask_logits
from qwen_cls.modeling import MODEL_INPUTS
from qwen_cls.rows import image_size_problem, local_image_path
from qwen_cls.run_dir import HF_DIR, INFO_FILE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Predictor:
    """Top-k labels for images.

    Args:
        checkpoint_path: a ``checkpoint-<step>`` folder, its ``hf_model/``, or a run folder (its newest checkpoint).
        config_path: the training YAML, where the checkpoint has no ``training_info.json`` beside it.
        device: ``cuda``, ``cpu``, ...; default: the GPU when there is one.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        checkpoint_path: str | Path,
        config_path: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
    ):
        quiet_library_chatter()
        path = Path(checkpoint_path)
        if path.name == HF_DIR and (path.parent / INFO_FILE).is_file():
            path = path.parent
        self.checkpoint = resolve_checkpoint(path)
        run = read_config(self.checkpoint, config_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = load_module(self.checkpoint, run)
        self.module.configure_model()
        self.module.eval().to(self.device)
        datamodule = make_datamodule(run, [], _processor_path(self.checkpoint, run), batch_size)
        self.collate = datamodule.collator()
        self.dataset_names = self.module.dataset_names
        self.batch_size = batch_size
        datasets = self.module.datasets
        # each dataset's own label names (its class_names): with several datasets a column means one label of each
        self.label_names = [
            datasets.names(n) if n in datasets.dataset_configs else [] for n in self.dataset_names
        ]

    def _dataset_idx(self, dataset: str | None) -> int:
        if dataset is None:
            if len(self.dataset_names) > 1:
                raise ConfigError(f"dataset: this model was trained on {self.dataset_names}; name one")
            return 0
        if dataset not in self.dataset_names:
            raise ConfigError(f"dataset: {dataset!r} is not one of {self.dataset_names}")
        return self.dataset_names.index(dataset)

    @torch.inference_mode()
    def predict(
        self, images: Image.Image | str | Path | Iterable[Image.Image | str | Path], top_k: int = 5,
        dataset: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Top-k labels of images as JSON lines (``qwen-cls predict``; the parameters and exit status:
        :func:`qwen_cls.commands.predict`). Returns the number of unreadable images."""
        if isinstance(images, Image.Image | str | Path):
            images = [images]
        items = [(img, self._dataset_idx(dataset)) for img in images]
        return self.predict_items(items, top_k)

    def predict_items(
        self, items: list[tuple[Image.Image | str | Path, int]], top_k: int
    ) -> list[dict[str, Any]]:
        """Like :meth:`predict`, each image with its own dataset index."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            opened, rows = [], []
            for image, dataset_idx in chunk:
                row: dict[str, Any] = {"input": str(image) if isinstance(image, str | Path) else None}
                try:
                    opened.append((_open(image), -1, dataset_idx, False))
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    row["error"] = f"cannot read image: {e}"
                rows.append(row)
            if opened:
                batch = self.collate(opened)
                inputs = {k: batch[k].to(self.device) for k in (*MODEL_INPUTS, "dataset_idx") if k in batch}
                logits = mask_logits(
                    self.module(inputs).float(), self.module.valid_classes(inputs["dataset_idx"])
                )
                probs, indices = logits.softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
                readable = iter(
                    zip(probs.tolist(), indices.tolist(), [row[2] for row in opened], strict=True)
                )
                for row in rows:
                    if "error" not in row:
                        p, i, dataset_idx = next(readable)
                        row.update(labels=self._names(dataset_idx, i), indices=i, probabilities=p)
            results += rows
        return results

    def _names(self, dataset_idx: int, indices: list[int]) -> list[str]:
        names = self.label_names[dataset_idx]
        return [names[j] if j < len(names) else str(j) for j in indices]


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        problem = image_size_problem(*image.size)
        if problem:
            raise ValueError(problem)
        return to_rgb(image)
    return load_image(image)


def _inputs(given: str) -> list[tuple[Path, str | None, dict[str, Any]]]:
    """(image, dataset name or None, fields to carry over) for an image, a folder of images or a JSONL file."""
    try:
        path = Path(local_image_path(given))
    except ValueError as e:
        raise DataError(f"--inputs: {e}") from None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [(p, None, {}) for p in files]
    if not path.is_file():
        raise DataError(f"{path}: not found")
    if path.suffix.lower() != ".jsonl":
        return [(path, None, {})]
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = Path(local_image_path(row["image_path"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}:{lineno}: expected a JSON object with image_path ({e})") from None
        except ValueError as e:  # a remote URL
            raise DataError(f"{path}:{lineno}: {e}") from None
        carry = {k: row[k] for k in ("label", "dataset_name") if k in row}
        items.append((image if image.is_absolute() else path.parent / image, row.get("dataset_name"), carry))
    return items


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
    be read the command fails (exit 2).

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
    for key, value in (("top_k", top_k), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"--{key}: must be >= 1, got {value}")
    out = Path(output).open("w") if output else sys.stdout
    with contextlib.redirect_stdout(
        sys.stderr if out is sys.stdout else sys.stdout
    ):  # stdout: JSON lines only
        predictor = Predictor(checkpoint_path, config_path=config_path, batch_size=batch_size)
        items = _inputs(inputs)
        indexed = [(image, predictor._dataset_idx(name or dataset)) for image, name, _ in items]
        results = predictor.predict_items(indexed, top_k)
    try:
        for (_, _, carry), result in zip(items, results, strict=True):
            out.write(json.dumps({**result, **carry}) + "\n")
    finally:
        if output:
            out.close()
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"qwen-cls predict: {r['input']}: {r['error']}", file=sys.stderr)
    summary = f"predicted {len(results) - len(failed)} images" + (
        f", {len(failed)} unreadable" if failed else ""
    )
    if output:
        say(f"{summary} -> {output}")
    else:  # stdout carries the JSON lines
        print(f"[qwen-cls] {summary}", file=sys.stderr)
    if failed and len(failed) == len(results):  # nothing predicted: a script must not take it for success
        raise DataError(f"none of the {len(results)} images could be read (the first: {failed[0]['input']})")
    return len(failed)

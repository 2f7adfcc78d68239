"""JSONL rows are checked before training: each bad row names its file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qwen_cls.config import DatasetConfig, DatasetsConfig
from qwen_cls.data import Batch, QwenDataModule, eval_subset, export_demo_data
from qwen_cls.errors import DataError
from qwen_cls.rows import read_rows

CONFIGS = {"food101": DatasetConfig(num_classes=101), "mnist": DatasetConfig(num_classes=10)}


@pytest.fixture
def image(demo_data) -> Path:
    return demo_data / "images" / "00000.png"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def good(image: Path, **extra) -> str:
    return json.dumps({"image_path": str(image), "label": 3, "dataset_name": "mnist", **extra})


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"image_path": "x.png", "label": 1', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"label": 1, "dataset_name": "mnist"}', "missing 'image_path'"),
        ('{"image_path": "IMG", "dataset_name": "mnist"}', "'label' must be an integer"),
        ('{"image_path": "IMG", "label": "3", "dataset_name": "mnist"}', "'label' must be an integer"),
        ('{"image_path": "IMG", "label": 1, "dataset_name": "cifar10"}', "unknown dataset 'cifar10'"),
        (
            '{"image_path": "IMG", "label": 10, "dataset_name": "mnist"}',
            "label 10 out of range for dataset 'mnist'",
        ),
        ('{"image_path": "IMG", "label": -1, "dataset_name": "mnist"}', "out of range"),
        ('{"image_path": "IMG", "label": 1}', "missing 'dataset_name'"),
        ('{"image_path": "no/such.png", "label": 1, "dataset_name": "mnist"}', "image not found"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, image, bad_line, message):
    path = write_jsonl(
        tmp_path / "train.jsonl", [good(image), "", good(image), bad_line.replace("IMG", str(image))]
    )
    with pytest.raises(DataError) as err:
        read_rows(path, CONFIGS)
    assert str(err.value).startswith(f"{path}:4: ")
    assert message in str(err.value)


def test_rows_accept_aliases_relative_paths_and_a_single_default_dataset(tmp_path, demo_data):
    # image paths are relative to the JSONL file, not to the working directory
    path = write_jsonl(
        demo_data.parent / "rows.jsonl",
        [json.dumps({"image": f"{demo_data.name}/images/00001.png", "label": 2, "dataset": "mnist"})],
    )
    rows = read_rows(str(path), {"mnist": DatasetConfig(10)})
    assert rows[0].image_path == demo_data / "images" / "00001.png" and rows[0].label == 2
    no_dataset = write_jsonl(
        tmp_path / "one.jsonl", [json.dumps({"image_path": str(rows[0].image_path), "label": 2})]
    )
    assert read_rows(no_dataset, {"mnist": DatasetConfig(10)})[0].dataset_idx == 0


def test_demo_data_is_a_stratified_deterministic_split(demo_data, tmp_path):
    train = [json.loads(x) for x in (demo_data / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (demo_data / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (4000, 1000)
    assert sorted({r["label"] for r in val}) == list(range(10))
    assert all(sum(r["label"] == d for r in val) == 100 for d in range(10))
    assert not {r["image_path"] for r in train} & {r["image_path"] for r in val}
    again = export_demo_data(tmp_path / "again")
    assert (again / "val.jsonl").read_text() == (demo_data / "val.jsonl").read_text()


def test_eval_subset_is_fixed_and_per_dataset(demo_data):
    rows = read_rows(demo_data / "val.jsonl", {"mnist": DatasetConfig(10, eval_ratio=0.25)})
    configs = {"mnist": DatasetConfig(10, eval_ratio=0.25)}
    first, second = eval_subset(rows, configs), eval_subset(rows, configs)
    assert len(first) == 250 and list(first) == list(second)
    # the rows the list-of-rows implementation picked: resumed and post-hoc evaluations score the same ones
    picked = sorted(random.Random(0).sample(range(1000), 250))
    assert [r.source for r in first] == [f"{demo_data / 'val.jsonl'}:{i + 1}" for i in picked]


def test_batches_carry_model_inputs_labels_and_dataset_index(tiny_model, demo_data):
    dm = QwenDataModule(
        demo_data / "train.jsonl",
        batch_size=4,
        num_workers=0,
        processor_path=str(tiny_model),
        datasets=DatasetsConfig({"mnist": DatasetConfig(10)}),
    )
    dm.setup("fit")
    assert dm.val_rows is None  # validation data is not read unless validation will run
    batch = next(iter(dm.train_dataloader()))
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert key in batch
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    assert batch["dataset_idx"].tolist() == [0, 0, 0, 0]
    # one entry per sample: the real tokens of each (what throughput, MFU and samples_seen count)
    assert torch.equal(batch["sample_lengths"], batch["attention_mask"].sum(-1))
    assert set(batch) == set(Batch.__annotations__) - ({"mm_token_type_ids"} - set(batch))
    images = [dm.train_dataloader().dataset[i] for i in range(3)]
    partial = dm.collator()([images[0], None, images[2]])  # an image left out (data.on_bad_image: skip)
    assert partial["sample_lengths"].shape == (2,) and int(partial["skipped_images"]) == 1

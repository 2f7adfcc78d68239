"""The run folder's records: one schema each, read by every tool, tolerant of older files, strict about
files that are not records at all."""

from __future__ import annotations

import json

import pytest

from qwen_cls.errors import CheckpointError
from qwen_cls.run_dir import BestRecord, CheckpointInfo, read_best, read_info, write_best, write_info


def test_checkpoint_info_round_trips_and_keeps_what_it_does_not_know(tmp_path):
    info = CheckpointInfo(step=40, epoch=1, final=True, config={"model": {"num_labels": 10}}, overrides=["x"])
    write_info(tmp_path / "training_info.json", info)
    written = json.loads((tmp_path / "training_info.json").read_text())
    assert (
        written["step"] == 40 and written["stopped_by"] is None and "wandb" not in written
    )  # optional: absent
    assert read_info(tmp_path) == info
    assert info.section("model") == {"num_labels": 10} and info.section("wandb") == {}

    (tmp_path / "training_info.json").write_text(json.dumps({"step": 5, "from_a_newer_version": [1, 2]}))
    older = read_info(tmp_path)  # fields it lacks read as their defaults; unknown keys survive a rewrite
    assert (older.step, older.final, older.config, older.extra) == (
        5,
        False,
        {},
        {"from_a_newer_version": [1, 2]},
    )
    write_info(tmp_path / "training_info.json", older)
    assert json.loads((tmp_path / "training_info.json").read_text())["from_a_newer_version"] == [1, 2]


@pytest.mark.parametrize("text", ["[]", '{"loss": 1.0}', "{"])
def test_a_file_that_is_no_checkpoint_info_is_one_line(tmp_path, text):
    (tmp_path / "training_info.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"training_info.json: (not a training_info.json|unreadable)"):
        read_info(tmp_path)


def test_best_record_has_one_schema_for_both_writers(tmp_path):
    assert read_best(tmp_path) is None
    training = BestRecord("checkpoint-20", 20, "overall_accuracy", "max", 0.9)
    write_best(tmp_path, training)
    assert read_best(tmp_path) == training and training.source == "training" and training.eval_data is None
    scored = BestRecord(
        "checkpoint-30", 30, "overall_loss", "min", 0.3, source="evaluate-all", eval_data="v.jsonl"
    )
    write_best(tmp_path, scored)
    assert set(json.loads((tmp_path / "best_checkpoint.json").read_text())) == set(
        BestRecord.__dataclass_fields__
    )
    assert read_best(tmp_path) == scored

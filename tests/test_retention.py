"""Retention as a table: which folders and states a run keeps after each save, and what the disk check offers."""

from __future__ import annotations

import pytest

from qwen_cls.errors import ConfigError
from qwen_cls.retention import Retention

# settings, the best checkpoint after each save (None: not tracked), and after the last save: the folders kept,
# the ones that keep their state
TABLE = [
    ("every one", Retention(), None, [5, 10, 15, 20], [5, 10, 15, 20]),
    ("keep_last_n 2", Retention(keep_last_n=2), None, [15, 20], [15, 20]),
    ("keep_all wins over keep_last_n", Retention(keep_all=True, keep_last_n=2), None, [5, 10, 15, 20], [5, 10, 15, 20]),
    ("keep_state_last_n 1", Retention(keep_state_last_n=1), None, [5, 10, 15, 20], [20]),
    ("best only, best at 10", Retention(keep_best_only=True, tracking=True), 10, [10, 20], [10, 20]),
    ("last 1 + the best", Retention(keep_last_n=1, tracking=True), 5, [5, 20], [5, 20]),
    ("state in the newest + the best", Retention(keep_state_last_n=1, tracking=True), 10, [5, 10, 15, 20], [10, 20]),
]  # fmt: skip


@pytest.mark.parametrize("name,retention,best,folders,states", TABLE, ids=[row[0] for row in TABLE])
def test_what_is_kept_after_four_saves(name, retention, best, folders, states):
    saved, stateless = [], set()
    for step in (5, 10, 15, 20):
        plan = retention.after_save(
            saved, f"checkpoint-{step}", None if best is None else f"checkpoint-{min(best, step)}"
        )
        saved = plan.saved
        stateless |= set(plan.drop_state)
        assert f"checkpoint-{step}" in saved and not set(plan.delete) & set(saved)
    assert saved == [f"checkpoint-{s}" for s in folders]
    assert [n for n in saved if n not in stateless] == [f"checkpoint-{s}" for s in states]


def test_the_best_checkpoint_keeps_its_state_beside_the_newest():
    """With best-model tracking the final evaluation reads the best checkpoint's state: it is kept too."""
    retention, saved, with_state = Retention(keep_state_last_n=1, tracking=True), [], set()
    for step, best, expected in [(5, 5, {5}), (10, 5, {5, 10}), (15, 15, {15}), (20, 15, {15, 20})]:
        plan = retention.after_save(saved, f"checkpoint-{step}", f"checkpoint-{best}")
        saved = plan.saved
        with_state = (with_state | {step}) - {int(p.rsplit("-", 1)[1]) for p in plan.drop_state}
        assert plan.delete == [] and with_state == expected, step


@pytest.mark.parametrize(
    "retention,folders,states",
    [
        (Retention(), 12, 12),
        (Retention(keep_best_only=True, tracking=True), 2, 2),
        (Retention(keep_last_n=3, tracking=True), 4, 4),
        (Retention(keep_state_last_n=2), 12, 2),
    ],
)
def test_the_disk_check_counts_what_is_kept(retention, folders, states):
    assert retention.folders_kept(12) == folders and retention.states_kept(folders) == states


def test_disk_remedies_offer_keep_last_n_only_where_folders_may_go():
    mib = 2**20
    offered = Retention().disk_remedies(10, hf_bytes=mib, state_bytes=3 * mib, free=12 * mib)
    assert offered[0].startswith("set training.keep_state_last_n: 1 (hf_model/ of every checkpoint, the resumable "
                                 "state of the newest only: 13.0 MiB, 27.0 MiB less)")  # fmt: skip
    assert offered[1] == "set training.keep_last_n (e.g. 1) to keep fewer checkpoints"
    assert len(Retention(keep_all=True).disk_remedies(10, mib, 3 * mib, 12 * mib)) == 1


@pytest.mark.parametrize("key", ["keep_last_n", "keep_state_last_n"])
def test_a_count_below_one_is_a_config_error(key):
    with pytest.raises(ConfigError, match=f"training.{key}: must be >= 1, got 0"):
        Retention(**{key: 0})

"""The config resolver: a table over skip_evaluation × save_all_checkpoints × each evaluation/best key."""

from __future__ import annotations

import itertools

import pytest

from qwen_cls.errors import ConfigError
from qwen_cls.policy import SKIP_EVALUATION_FORCES, resolve

EVAL_KEYS = ["partial_eval_during_training", "full_eval_at_end", "eval_best_model_only"]
BEST_KEYS = ["enabled", "save_best_only"]


def make(skip: bool, save_all: bool, value: bool, nested: bool = False, trainer: dict | None = None) -> dict:
    evaluation = {k: value for k in EVAL_KEYS}
    best = {k: value for k in BEST_KEYS} | {"metric": "overall_accuracy", "mode": "max"}
    training = {"skip_evaluation": skip, "save_all_checkpoints": save_all, "save_steps": 6, "eval_steps": 3}
    cfg = {"training": training, "trainer": trainer or {}}
    if nested:  # the original feature document writes these two sections under training:
        training["evaluation"], training["best_model_tracking"] = evaluation, best
    else:
        cfg["evaluation"], cfg["best_model_tracking"] = evaluation, best
    return cfg


def value(cfg: dict, dotted: str):
    section, key = dotted.split(".")
    return cfg[section][key]


@pytest.mark.parametrize(
    "save_all,value_of_every_eval_key,nested",
    list(itertools.product([False, True], [False, True], [False, True])),
)
def test_skip_evaluation_forces_the_six_keys_whatever_the_yaml_says(
    save_all, value_of_every_eval_key, nested
):
    res = resolve(make(True, save_all, value_of_every_eval_key, nested))
    for key, forced in SKIP_EVALUATION_FORCES.items():
        assert value(res.config, key) is forced, key
    assert res.trainer["limit_val_batches"] == 0
    assert res.trainer["num_sanity_val_steps"] == 0
    assert res.checkpoint == {"monitor": None, "save_top_k": -1, "every_n_train_steps": 6, "keep_all": True}
    # exactly the keys whose value changed are reported, each once
    changed = {k for k, forced in SKIP_EVALUATION_FORCES.items() if k != "training.save_all_checkpoints"}
    changed = changed if value_of_every_eval_key else set()
    if not save_all:
        changed.add("training.save_all_checkpoints")
    assert {o.key for o in res.overrides} == changed
    assert len(res.overrides) == len(changed)
    assert all(str(o).startswith("training.skip_evaluation=true overrides ") for o in res.overrides)


def test_skip_evaluation_also_wins_over_lightning_trainer_keys():
    res = resolve(make(True, True, True, trainer={"limit_val_batches": 0.5, "num_sanity_val_steps": 2}))
    assert res.trainer["limit_val_batches"] == 0 and res.trainer["num_sanity_val_steps"] == 0
    reported = {o.key: (o.was, o.now) for o in res.overrides}
    assert reported["trainer.limit_val_batches"] == (0.5, 0)
    assert reported["trainer.num_sanity_val_steps"] == (2, 0)


@pytest.mark.parametrize("save_all", [False, True])
@pytest.mark.parametrize(
    "key", [f"evaluation.{k}" for k in EVAL_KEYS] + [f"best_model_tracking.{k}" for k in BEST_KEYS]
)
def test_standard_mode_keeps_evaluation_settings(save_all, key):
    """skip off: the evaluation keys are the user's, validation runs every eval_steps."""
    cfg = make(False, save_all, True)
    res = resolve(cfg)
    assert res.config["training"]["save_all_checkpoints"] is save_all
    assert res.trainer["val_check_interval"] == 3
    assert res.trainer["limit_val_batches"] == 1.0
    assert res.checkpoint["monitor"] == "eval/overall_accuracy"
    # save_all_checkpoints keeps every checkpoint even with save_best_only; otherwise only the best (+ latest)
    assert res.checkpoint["save_top_k"] == -1
    assert res.checkpoint["keep_best_only"] is (not save_all)
    assert res.checkpoint["keep_all"] is save_all
    assert res.checkpoint["mode"] == "max"
    kept = not (save_all and key == "best_model_tracking.save_best_only")
    assert value(res.config, key) is kept
    # the one change standard mode makes: save_all_checkpoints turns save_best_only off
    assert [o.key for o in res.overrides] == (["best_model_tracking.save_best_only"] if save_all else [])


# one key set to false (every other evaluation/best key true, save_all_checkpoints false): the user's false is
# kept, the keys that depend on it are switched off and reported, and what the key controls changes
FLIPPED = [
    (
        "evaluation.partial_eval_during_training",
        {"best_model_tracking.enabled", "evaluation.eval_best_model_only"},
        {"limit_val_batches": 0, "monitor": None},
    ),
    ("evaluation.full_eval_at_end", set(), {"limit_val_batches": 1.0, "monitor": "eval/overall_accuracy"}),
    (
        "evaluation.eval_best_model_only",
        set(),
        {"limit_val_batches": 1.0, "monitor": "eval/overall_accuracy"},
    ),
    (
        "best_model_tracking.enabled",
        {"evaluation.eval_best_model_only"},
        {"limit_val_batches": 1.0, "monitor": None},
    ),
    ("best_model_tracking.save_best_only", set(), {"limit_val_batches": 1.0, "keep_best_only": True}),
]


@pytest.mark.parametrize("key,switched_off,effect", FLIPPED, ids=[row[0] for row in FLIPPED])
def test_standard_mode_one_key_off(key, switched_off, effect):
    cfg = make(False, False, True)
    section, name = key.split(".")
    cfg[section][name] = False
    res = resolve(cfg)
    assert value(res.config, key) is False
    assert {o.key for o in res.overrides} == switched_off
    assert all(value(res.config, k) is False for k in switched_off)
    seen = {**res.trainer, **res.checkpoint}
    assert {k: seen.get(k) for k in effect} == effect


# training.keep_last_n against the modes: every checkpoint is kept wherever the config promises all of them
KEEP_LAST_N = [
    # skip_evaluation, save_all_checkpoints, kept keep_last_n, the reason reported (None: no override)
    (True, False, None, "training.skip_evaluation=true"),
    (True, True, None, "training.skip_evaluation=true"),
    (False, True, None, "training.save_all_checkpoints=true"),
    (False, False, 2, None),
]


@pytest.mark.parametrize("skip,save_all,kept,reason", KEEP_LAST_N)
def test_keep_last_n_gives_way_to_every_checkpoint_kept(skip, save_all, kept, reason):
    cfg = make(skip, save_all, False)
    cfg["training"]["keep_last_n"] = 2
    res = resolve(cfg)
    assert res.config["training"]["keep_last_n"] == kept
    assert res.checkpoint["keep_all"] is (kept is None)
    overrides = {o.key: str(o) for o in res.overrides}
    if reason is None:
        assert "training.keep_last_n" not in overrides
    else:
        assert overrides["training.keep_last_n"] == f"{reason} overrides training.keep_last_n: 2 -> null"


def test_standard_mode_without_partial_eval_does_not_validate_during_fit():
    cfg = make(False, True, False)
    cfg["evaluation"]["full_eval_at_end"] = True
    res = resolve(cfg)
    assert res.trainer["limit_val_batches"] == 0
    assert res.config["evaluation"]["full_eval_at_end"] is True
    assert res.checkpoint["monitor"] is None


def test_best_tracking_needs_partial_evaluation():
    cfg = make(False, False, True)
    cfg["evaluation"]["partial_eval_during_training"] = False
    res = resolve(cfg)
    assert res.config["best_model_tracking"]["enabled"] is False
    assert res.config["evaluation"]["eval_best_model_only"] is False
    assert {o.key for o in res.overrides} == {
        "best_model_tracking.enabled",
        "evaluation.eval_best_model_only",
    }


def test_eval_steps_count_optimizer_steps_under_accumulation():
    res = resolve(make(False, True, True, trainer={"accumulate_grad_batches": 4}))
    assert res.trainer["val_check_interval"] == 12  # 3 optimizer steps x 4 batches


def test_resolver_is_pure():
    cfg = make(True, False, True, nested=True)
    snapshot = repr(cfg)
    resolve(cfg)
    assert repr(cfg) == snapshot


def test_best_metric_must_be_known_and_listed_in_the_error():
    cfg = make(False, True, True)
    cfg["datasets"] = {"dataset_configs": {"food101": {}, "food2k": {}}}
    cfg["best_model_tracking"]["metric"] = "food2k_accuracy"
    assert resolve(cfg).checkpoint["monitor"] == "eval/food2k_accuracy"
    for metric in ("overall_macro_f1", "food101_balanced_accuracy", "food2k_top5_accuracy"):
        cfg["best_model_tracking"]["metric"] = metric
        assert resolve(cfg).checkpoint["monitor"] == f"eval/{metric}"
    cfg["best_model_tracking"]["metric"] = "accuracy"
    with pytest.raises(ConfigError, match="best_model_tracking.metric") as err:
        resolve(cfg)
    assert "overall_top5_accuracy" in str(err.value) and "food101_loss" in str(err.value)
    # a bad best_model_tracking.mode never reaches the resolver: it is a choice refused at parse time (test_cli)


def test_best_tracking_needs_save_steps_on_evaluation_steps():
    cfg = make(False, True, True)
    cfg["training"]["save_steps"] = 7
    with pytest.raises(ConfigError, match="multiple of training.eval_steps"):
        resolve(cfg)
    cfg["best_model_tracking"]["enabled"] = False
    assert resolve(cfg).checkpoint["every_n_train_steps"] == 7

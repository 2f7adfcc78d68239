"""Per-class metrics against a confusion matrix computed by hand, the evaluation sampler's split, and the
per-class files a person reads."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from qwen_cls.class_report import READABLE_CLASSES, class_rows, weakest, worst_pairs, write_confusion
from qwen_cls.config import DatasetsConfig
from qwen_cls.data import EvalSampler
from qwen_cls.errors import ConfigError
from qwen_cls.evaluation import check_class_names
from qwen_cls.metrics import ClassificationMetrics

# Dataset "a" (3 classes) and dataset "b" (2 classes) share a 3-column head. Labels and predictions, by hand:
A_LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2]
A_PREDS = [0, 0, 1, 1, 2, 2, 2, 2, 0]
B_LABELS = [0, 0, 1, 1]
B_PREDS = [0, 1, 1, 1]
# a: confusion [[2,1,0],[0,1,1],[1,0,3]]
#   class 0: tp 2, predicted 3, support 3 -> P 2/3, R 2/3, F1 2/3
#   class 1: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
#   class 2: tp 3, predicted 4, support 4 -> P 3/4, R 3/4, F1 3/4
# b: confusion [[1,1],[0,2]]
#   class 0: P 1, R 1/2, F1 2/3; class 1: P 2/3, R 1, F1 4/5
HAND = {
    "a": {
        "confusion": [[2, 1, 0], [0, 1, 1], [1, 0, 3]],
        "precision": [2 / 3, 1 / 2, 3 / 4],
        "recall": [2 / 3, 1 / 2, 3 / 4],
        "f1": [2 / 3, 1 / 2, 3 / 4],
        "support": [3, 2, 4],
    },
    "b": {
        "confusion": [[1, 1], [0, 2]],
        "precision": [1.0, 2 / 3],
        "recall": [1 / 2, 1.0],
        "f1": [2 / 3, 4 / 5],
        "support": [2, 2],
    },
}


def _logits(preds: list[int], labels: int = 3) -> torch.Tensor:
    """Logits whose argmax is each prediction, the other columns in a fixed order below it."""
    logits = torch.arange(labels, dtype=torch.float32).flip(0).repeat(len(preds), 1) * 0.1
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return logits


def _metric_on_the_hand_example(split: int) -> ClassificationMetrics:
    """The example fed in ``split`` batches, each with a filler row (weight 0, a wrong prediction) that must
    not count."""
    metric = ClassificationMetrics(["a", "b"], num_labels=3)
    labels = torch.tensor(A_LABELS + B_LABELS)
    preds = A_PREDS + B_PREDS
    dataset = torch.tensor([0] * len(A_LABELS) + [1] * len(B_LABELS))
    for part in torch.arange(len(labels)).chunk(split):
        idx = part.tolist()
        logits = torch.cat([_logits([preds[i] for i in idx]), _logits([2])])
        metric.update(
            logits,
            torch.cat([labels[part], torch.tensor([0])]),
            torch.cat([dataset[part], torch.tensor([0])]),
            torch.ones(len(idx) + 1),
            torch.tensor([True] * len(idx) + [False]),
        )
    return metric


@pytest.mark.parametrize("split", [1, 4])
def test_per_class_metrics_equal_the_hand_computed_confusion_matrix(split):
    metric = _metric_on_the_hand_example(split)
    out = metric.compute()
    for name, hand in HAND.items():
        scores = metric.last_classes[name]
        n = len(hand["support"])
        assert scores.classes == list(range(n))
        assert scores.confusion[:n, :n].tolist() == hand["confusion"]
        assert scores.confusion.sum().item() == sum(hand["support"])  # the filler rows counted nowhere
        for key in ("precision", "recall", "f1"):
            assert getattr(scores, key) == pytest.approx(hand[key], abs=1e-12), (name, key)
        assert scores.support == hand["support"]
        assert out[f"{name}_macro_f1"] == pytest.approx(sum(hand["f1"]) / n, abs=1e-12)
        assert out[f"{name}_balanced_accuracy"] == pytest.approx(sum(hand["recall"]) / n, abs=1e-12)
    assert out["a_accuracy"] == pytest.approx(6 / 9) and out["b_accuracy"] == pytest.approx(3 / 4)
    assert out["overall_samples"] == 13
    every_f1 = HAND["a"]["f1"] + HAND["b"]["f1"]
    assert out["overall_macro_f1"] == pytest.approx(sum(every_f1) / 5, abs=1e-12)


def test_per_class_metrics_agree_with_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (500,), generator=g)
    logits = torch.randn(500, 9, generator=g)  # predictions may fall on columns no label has (7, 8)
    metric = ClassificationMetrics(["x"], num_labels=9)
    metric.update(logits, labels, torch.zeros(500, dtype=torch.long), torch.ones(500))
    out = metric.compute()
    preds = logits.argmax(-1).numpy()
    p, r, f, s = sklearn.precision_recall_fscore_support(labels.numpy(), preds, zero_division=0)
    scores = metric.last_classes["x"]
    assert scores.precision == pytest.approx(p.tolist()) and scores.recall == pytest.approx(r.tolist())
    assert scores.f1 == pytest.approx(f.tolist()) and scores.support == s.tolist()
    assert out["x_macro_f1"] == pytest.approx(
        sklearn.f1_score(labels.numpy(), preds, average="macro", zero_division=0)
    )
    assert out["x_balanced_accuracy"] == pytest.approx(sklearn.balanced_accuracy_score(labels.numpy(), preds))
    assert torch.equal(
        scores.confusion[scores.classes][:, scores.classes],
        torch.from_numpy(sklearn.confusion_matrix(labels.numpy(), preds)),
    )


@pytest.mark.parametrize(("rows", "ranks"), [(91, 2), (91, 4), (7, 7), (100, 3), (1, 1), (5, 3)])
def test_the_eval_sampler_gives_every_row_once_and_every_rank_as_many(rows, ranks):
    shares = [list(EvalSampler(rows, ranks, r)) for r in range(ranks)]
    assert len({len(s) for s in shares}) == 1 and all(
        len(s) == len(EvalSampler(rows, ranks, 0)) for s in shares
    )
    real = sorted(i for s in shares for i in s if i < rows)
    assert real == list(range(rows))  # each row exactly once
    fillers = [i for s in shares for i in s if i >= rows]
    assert len(fillers) == len(shares[0]) * ranks - rows and all(i - rows < rows for i in fillers)


def test_weakest_classes_and_the_confusion_files(tmp_path):
    metric = _metric_on_the_hand_example(1)
    metric.compute()
    datasets = DatasetsConfig(
        {"a": {"num_classes": 3, "class_names": ["cat", "dog", "fox"]}, "b": {"num_classes": 2}}
    )
    rows = class_rows(metric.last_classes, datasets)
    assert [(r["dataset"], r["name"]) for r in rows] == [
        ("a", "cat"),
        ("a", "dog"),
        ("a", "fox"),
        ("b", "0"),
        ("b", "1"),
    ]
    # F1 1/2 first; then a tie at 2/3 (a/cat, b/0), broken by the lower recall (b/0: 1/2)
    assert [(r["dataset"], r["name"]) for r in weakest(rows, 2)] == [("a", "dog"), ("b", "0")]
    csv_path, png = write_confusion(tmp_path / "e", "a", metric.last_classes["a"], datasets.names("a"))
    with csv_path.open() as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == ["cat", "dog", "fox"]
    assert [[int(v) for v in row[1:]] for row in table[1:]] == HAND["a"]["confusion"]
    with Image.open(png) as image:
        assert image.format == "PNG"


def test_a_101_class_confusion_png_lists_the_worst_pairs_by_name(tmp_path):
    n = 101
    assert n > READABLE_CLASSES
    confusion = torch.eye(n, dtype=torch.long) * 10
    confusion[3, 7], confusion[50, 2] = 6, 3
    pairs = worst_pairs(confusion, [f"c{i}" for i in range(n)])
    assert pairs[:2] == [("c3", "c7", 6, 6 / 16), ("c50", "c2", 3, 3 / 13)] and len(pairs) == 2
    metric = ClassificationMetrics(["food"], num_labels=n)
    labels = torch.arange(n).repeat(2)
    metric.update(
        _logits(labels.tolist(), n), labels, torch.zeros(2 * n, dtype=torch.long), torch.ones(2 * n)
    )
    metric.compute()
    _, png = write_confusion(tmp_path / "e", "food", metric.last_classes["food"], None)
    with Image.open(png) as image:
        assert image.size[0] >= 1600  # the matrix and the bar chart side by side


def test_class_names_that_disagree_with_the_checkpoints_are_refused(tmp_path):
    from qwen_cls.config import RunConfig

    hf = tmp_path / "checkpoint-5" / "hf_model"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog"}}))
    config = {"model": {"num_labels": 2}, "datasets": {"dataset_configs": {"pets": {"num_classes": 2}}}}
    run = RunConfig.from_mapping(
        {
            **config,
            "datasets": {"dataset_configs": {"pets": {"num_classes": 2, "class_names": ["cat", "dog"]}}},
        }
    )
    check_class_names(tmp_path / "checkpoint-5", run)  # the same names
    swapped = RunConfig.from_mapping(
        {
            **config,
            "datasets": {"dataset_configs": {"pets": {"num_classes": 2, "class_names": ["dog", "cat"]}}},
        }
    )
    with pytest.raises(ConfigError, match=r"class 0 is 'dog' here but 'cat' in .*config.json"):
        check_class_names(tmp_path / "checkpoint-5", swapped)
    (hf / "config.json").write_text(json.dumps({"id2label": {"0": "0", "1": "1"}}))
    check_class_names(tmp_path / "checkpoint-5", swapped)  # trained without names: nothing to disagree with

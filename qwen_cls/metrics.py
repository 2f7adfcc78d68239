"""Evaluation metrics, overall and per dataset, as one torchmetrics Metric: top-1/top-5 accuracy, the
sample-weighted loss, and per class (precision, recall, F1, support, the confusion matrix), from which macro-F1
and balanced accuracy.

Sums (not means) are the states, so a data-parallel run reduces them exactly across ranks; each sample carries a
weight, 0 for the filler rows that even out the ranks' batches (see :class:`qwen_cls.data.EvalSampler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import Metric

# The confusion matrix is kept up to this many columns (8 MB of float64 per dataset); beyond, per-class counts only.
CONFUSION_MAX_LABELS = 1000


@dataclass
class ClassScores:
    """One dataset's per-class results: rows of ``classes`` are the class indices that occurred (as a label or
    a prediction); ``confusion[i, j]`` counts samples of label ``i`` predicted ``j`` (all columns), or None when
    the head has more than :data:`CONFUSION_MAX_LABELS` columns."""

    classes: list[int]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    predicted: list[int]
    confusion: torch.Tensor | None

    def rows(self, names: list[str] | None = None) -> list[dict]:
        """One mapping per class, with its name from ``names`` (indexed by class) where it has one."""
        out = []
        for i, c in enumerate(self.classes):
            name = names[c] if names and c < len(names) else str(c)
            out.append(
                {
                    "class": c,
                    "name": name,
                    "precision": self.precision[i],
                    "recall": self.recall[i],
                    "f1": self.f1[i],
                    "support": self.support[i],
                    "predicted": self.predicted[i],
                }
            )
        return out


def class_scores(true_count: torch.Tensor, pred_count: torch.Tensor, hits: torch.Tensor) -> ClassScores:
    """Precision, recall and F1 of each class that occurs as a label or a prediction (as scikit-learn's
    ``precision_recall_fscore_support`` with ``labels`` unset, ``zero_division=0``)."""
    occurs = ((true_count > 0) | (pred_count > 0)).nonzero().flatten()
    t, p, h = true_count[occurs], pred_count[occurs], hits[occurs]
    precision = torch.where(p > 0, h / p.clamp(min=1), 0.0)
    recall = torch.where(t > 0, h / t.clamp(min=1), 0.0)
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0
    )
    return ClassScores(
        occurs.tolist(),
        precision.tolist(),
        recall.tolist(),
        f1.tolist(),
        t.long().tolist(),
        p.long().tolist(),
        None,
    )


def macro_f1(scores: list[ClassScores]) -> float:
    """The mean F1 over every (dataset, class) that occurs."""
    values = [v for s in scores for v in s.f1]
    return sum(values) / len(values) if values else 0.0


def balanced_accuracy(scores: list[ClassScores]) -> float:
    """The mean recall over every (dataset, class) that has samples (scikit-learn's ``balanced_accuracy_score``)."""
    values = [r for s in scores for r, n in zip(s.recall, s.support, strict=True) if n > 0]
    return sum(values) / len(values) if values else 0.0


class ClassificationMetrics(Metric):
    full_state_update = False

    def __init__(self, dataset_names: list[str], num_labels: int, top_k: int = 5):
        super().__init__()
        self.dataset_names = list(dataset_names)
        self.num_labels = num_labels
        self.top_k = top_k
        n = len(self.dataset_names)
        for name in ("correct_top1", "correct_topk", "loss_sum", "count"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("true_count", "pred_count", "hits"):  # per dataset and class
            self.add_state(
                name, default=torch.zeros(n, num_labels, dtype=torch.float64), dist_reduce_fx="sum"
            )
        self.keeps_confusion = num_labels <= CONFUSION_MAX_LABELS
        if self.keeps_confusion:
            shape = (n, num_labels, num_labels)
            self.add_state("confusion", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.last_classes: dict[str, ClassScores] = {}

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        dataset_idx: torch.Tensor,
        losses: torch.Tensor,
        weights: torch.Tensor | None = None,
    ):
        """``weights``: 1 for a sample that counts, 0 for a filler row (default: all count)."""
        if (
            self.count.dtype != torch.float64
        ):  # a strategy cast the module's floats (DeepSpeed: to fp32 or 16-bit)
            for name in self._defaults:
                setattr(self, name, getattr(self, name).double())
        k = min(self.top_k, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        pred = topk[:, 0]
        w = torch.ones_like(labels, dtype=torch.float64) if weights is None else weights.to(torch.float64)
        hit1 = (pred == labels).double() * w
        hitk = (topk == labels[:, None]).any(-1).double() * w
        for state, values in (
            (self.correct_top1, hit1),
            (self.correct_topk, hitk),
            (self.loss_sum, losses.detach().double() * w),
            (self.count, w),
        ):
            state.index_add_(0, dataset_idx, values)
        c = self.num_labels
        for state, column, values in (
            (self.true_count, labels, w),
            (self.pred_count, pred, w),
            (self.hits, labels, hit1),
        ):
            state.view(-1).index_add_(0, dataset_idx * c + column, values)
        if self.keeps_confusion:
            self.confusion.view(-1).index_add_(0, (dataset_idx * c + labels) * c + pred, w)

    def compute(self) -> dict[str, float]:
        """Flat dict: ``overall_accuracy``, ``overall_top5_accuracy``, ``overall_loss``, ``overall_samples``,
        ``overall_macro_f1``, ``overall_balanced_accuracy`` and the same for each dataset that had samples
        (``<dataset>_accuracy`` ...). The per-class results are left in :attr:`last_classes` (per dataset)."""
        out: dict[str, float] = {}
        scores: dict[str, ClassScores] = {}
        for i, name in enumerate(self.dataset_names):
            if self.count[i] > 0:
                scores[name] = class_scores(self.true_count[i], self.pred_count[i], self.hits[i])
                if self.keeps_confusion:
                    scores[name].confusion = self.confusion[i].round().long().cpu()
        self.last_classes = scores
        groups = [("overall", slice(None), list(scores.values()))]
        groups += [(n, i, [scores[n]]) for i, n in enumerate(self.dataset_names) if n in scores]
        for name, sel, of in groups:
            count = self.count[sel].sum().item()
            if count == 0:
                continue
            out[f"{name}_accuracy"] = self.correct_top1[sel].sum().item() / count
            out[f"{name}_top{self.top_k}_accuracy"] = self.correct_topk[sel].sum().item() / count
            out[f"{name}_loss"] = self.loss_sum[sel].sum().item() / count
            out[f"{name}_samples"] = round(count)
            out[f"{name}_macro_f1"] = macro_f1(of)
            out[f"{name}_balanced_accuracy"] = balanced_accuracy(of)
        return out

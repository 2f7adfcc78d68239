"""Top-1/top-5 accuracy and sample-weighted loss, overall and per dataset, as one torchmetrics Metric.

Sums (not means) are the states, so a data-parallel run reduces them exactly across ranks.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ClassificationMetrics(Metric):
    full_state_update = False

    def __init__(self, dataset_names: list[str], top_k: int = 5):
        super().__init__()
        self.dataset_names = list(dataset_names)
        self.top_k = top_k
        n = len(self.dataset_names)
        for name in ("correct_top1", "correct_topk", "loss_sum", "count"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, dataset_idx: torch.Tensor, losses: torch.Tensor
    ):
        k = min(self.top_k, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit1 = (topk[:, 0] == labels).double()
        hitk = (topk == labels[:, None]).any(-1).double()
        for state, values in (
            (self.correct_top1, hit1),
            (self.correct_topk, hitk),
            (self.loss_sum, losses.detach().double()),
            (self.count, torch.ones_like(hit1)),
        ):
            state.index_add_(0, dataset_idx, values.to(state.dtype))  # DeepSpeed may have cast the states

    def compute(self) -> dict[str, float]:
        """Flat dict: ``overall_accuracy``, ``overall_top5_accuracy``, ``overall_loss``, ``overall_samples``
        and the same four for each dataset that had samples (``<dataset>_accuracy`` ...)."""
        out: dict[str, float] = {}
        groups = [("overall", slice(None))] + [(n, i) for i, n in enumerate(self.dataset_names)]
        for name, sel in groups:
            count = self.count[sel].sum().item()
            if count == 0:
                continue
            out[f"{name}_accuracy"] = self.correct_top1[sel].sum().item() / count
            out[f"{name}_top{self.top_k}_accuracy"] = self.correct_topk[sel].sum().item() / count
            out[f"{name}_loss"] = self.loss_sum[sel].sum().item() / count
            out[f"{name}_samples"] = int(count)
        return out

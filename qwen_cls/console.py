"""What the user reads on the console: our one-line messages, and the libraries' chatter kept out of them.

No torch and no Lightning at import: any module, and any process (a checking pool's), can use it.
"""

from __future__ import annotations

import logging
import warnings

from lightning_utilities.core.rank_zero import rank_zero_only


def tell(message: str) -> None:
    """One line on stdout, from whichever process calls it (:func:`say` is rank 0's)."""
    print(f"[qwen-cls] {message}", flush=True)


def say(message: str) -> None:
    """One line to the user on stdout, from global rank 0 only (the rank Lightning gave its ``rank_zero_only``;
    0 before Lightning is imported)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        tell(message)


def quiet_library_chatter() -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards") and no Lightning
    advertisement in our output; warnings and errors still come through."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # DeepSpeed calls torch.distributed's old collective names, once per call; Lightning points ZeRO-3 users
    # to a single-file conversion, where hf_model/ and `qwen-cls export` are the answer here
    warnings.filterwarnings(
        "ignore", r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated", FutureWarning
    )
    warnings.filterwarnings("ignore", "When saving the DeepSpeed Stage 3 checkpoint")
    # our datamodule saves and restores the position in the epoch (ResumableSampler), which Lightning cannot see
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning 2.6 calls torch's deprecated pytree API at every fit; nothing a user can act on
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    _drop("lightning.pytorch.utilities.rank_zero", "litlogger")
    # the evaluation metrics are reduced over the ranks by torchmetrics before they are logged
    warnings.filterwarnings("ignore", r"It is recommended to use `self.log\('eval/.*sync_dist=True")
    # DeepSpeed (imported by transformers' save_pretrained wherever installed) on a host without a GPU; the run's
    # own "attention: ... on cpu" line says where it runs. A filter set now stays when DeepSpeed sets its logger up.
    _drop("DeepSpeed", "Setting accelerator to CPU")


def _drop(logger: str, text: str) -> None:
    handle = logging.getLogger(logger)
    if not any(isinstance(f, _Drop) and f.text == text for f in handle.filters):
        handle.addFilter(_Drop(text))


class _Drop(logging.Filter):
    """Drops a logger's records that contain ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()

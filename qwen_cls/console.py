"""What the user reads on the console. No Lightning, no torch: any module (and any process) can use it."""

from __future__ import annotations


def tell(message: str) -> None:
    """One line on stdout, from whichever process calls it (:func:`qwen_cls.monitor.say` is rank 0's)."""
    print(f"[qwen-cls] {message}", flush=True)

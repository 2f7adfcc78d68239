"""Run monitoring helpers shared by training and evaluation."""

from __future__ import annotations

import netrc
import os


def wandb_online() -> bool:
    """Whether W&B can log online: a key in the environment or stored by ``wandb login`` (netrc), and
    ``WANDB_MODE`` not ``offline``. The key itself is never read into qwen-cls."""
    if os.environ.get("WANDB_MODE") == "offline":
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False

"""Which checkpoints a run keeps, and what that costs on disk: a pure object, tested as a table.

Folders are named ``checkpoint-<step>`` and remembered by name in the order they were saved. The newest is
always kept (it is the one to resume from), and so is the best when one is tracked (its state too: the final
evaluation reads it). ``keep_best_only`` keeps those two; ``keep_last_n`` the newest N (plus the best);
``keep_all`` every one (``skip_evaluation``, ``save_all_checkpoints``: the resolver has turned ``keep_last_n``
off). ``keep_state_last_n`` keeps the resumable state only in the newest N, never touching ``hf_model/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_cls.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """After a save: the folders still kept in save order, those to delete whole, and those whose state goes."""

    saved: list[str]
    delete: list[str]
    drop_state: list[str]


@dataclass(frozen=True)
class Retention:
    keep_best_only: bool = False
    keep_all: bool = False
    keep_last_n: int | None = None
    keep_state_last_n: int | None = None
    tracking: bool = False  # a best checkpoint is tracked (best_model_tracking in standard mode)

    def __post_init__(self) -> None:
        for key in ("keep_last_n", "keep_state_last_n"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"training.{key}: must be >= 1, got {value}")
        if self.keep_all and self.keep_last_n:
            object.__setattr__(self, "keep_last_n", None)  # every checkpoint is kept by contract

    def after_save(self, saved: list[str], latest: str, best: str | None) -> Plan:
        """What to delete once ``latest`` is complete, given the folders saved before it (oldest first)."""
        saved = [n for n in saved if n != latest] + [latest]
        keep = {latest, best} if self.tracking and best else {latest}
        if self.keep_best_only:
            delete = [n for n in saved if n not in keep]
        elif self.keep_last_n:
            delete = [n for n in saved[: -self.keep_last_n] if n not in keep]
        else:
            delete = []
        saved = [n for n in saved if n not in delete]
        n = self.keep_state_last_n
        drop = [name for name in saved[:-n] if name not in keep] if n else []
        return Plan(saved, delete, drop)

    def folders_kept(self, saves: int) -> int:
        """Of ``saves`` checkpoints still to write, how many folders are kept at once at the end."""
        if self.keep_best_only:
            return min(saves, 2)
        if self.keep_last_n:
            return min(saves, self.keep_last_n + self.tracking)
        return saves

    def states_kept(self, folders: int, keep_state_last_n: int | None = -1) -> int:
        """Of ``folders`` kept checkpoints, how many keep their resumable state (with this ``keep_state_last_n``,
        by default the run's own)."""
        n = self.keep_state_last_n if keep_state_last_n == -1 else keep_state_last_n
        return folders if n is None else min(folders, n + self.tracking)

    def disk_remedies(self, folders: int, hf_bytes: int, state_bytes: int, free: int) -> list[str]:
        """What the user can set when the kept checkpoints do not fit in ``free`` bytes, cheapest change first."""
        remedies = []
        need = folders * hf_bytes + self.states_kept(folders) * state_bytes
        if self.states_kept(folders) > 1:
            one = folders * hf_bytes + self.states_kept(folders, 1) * state_bytes
            remedies.append(
                f"set training.keep_state_last_n: 1 (hf_model/ of every checkpoint, the resumable state of the "
                f"newest only: {gib(one)}, {gib(need - one)} less)"
            )
        if not self.keep_all:
            fits = max(1, int(free // ((hf_bytes + state_bytes) * 1.05)) - 1)
            remedies.append(f"set training.keep_last_n (e.g. {fits}) to keep fewer checkpoints")
        return remedies


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

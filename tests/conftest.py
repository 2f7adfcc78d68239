"""Shared fixtures: the tiny Qwen2.5-VL and the MNIST demo data, built once per test session; and a check that
the session wrote nothing inside the repository (tests write under tmp_path). Helpers are in tests/helpers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_cls.data import export_demo_data
from qwen_cls.tiny import make_tiny

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# written by tools, not by tests: byte code, the venv, pytest's own cache, an editable install's metadata
TOOL_OUTPUT = ("__pycache__", ".venv", ".pytest_cache", ".egg-info", ".ruff_cache")


def _repo_files() -> set[str] | None:
    """Every path git sees in the checkout (tracked, untracked, ignored), but tool output; None outside git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all", "--ignored"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {line[3:] for line in out.splitlines() if not any(t in line for t in TOOL_OUTPUT)}


def pytest_sessionstart(session) -> None:
    session.config.stash[REPO_FILES] = _repo_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    before, after = session.config.stash.get(REPO_FILES, None), _repo_files()
    if before is None or after is None:
        return
    written = sorted(after - before)
    if written:
        print(
            f"\ntests wrote inside the repository (use tmp_path): {', '.join(written[:10])}", file=sys.stderr
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


REPO_FILES = pytest.StashKey[set | None]()


@pytest.fixture(scope="session", autouse=True)
def row_cache(tmp_path_factory) -> Path:
    """Checked rows are cached here, not in the user's ~/.cache (children inherit the variable)."""
    path = tmp_path_factory.mktemp("row-cache")
    os.environ["QWEN_CLS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_of(tmp_path_factory):
    """``tiny_of(family)``: the tiny model of a family, built once per session."""
    made: dict[str, Path] = {"qwen2_5_vl": None}

    def tiny(family: str) -> Path:
        if made.get(family) is None:
            made[family] = make_tiny(tmp_path_factory.mktemp(family) / f"tiny-{family}", family=family)
        return made[family]

    return tiny


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    return export_demo_data(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def val_subset(demo_data, tmp_path_factory) -> Path:
    """Every 5th validation row (all ten digits), with absolute image paths."""
    rows = [json.loads(line) for line in (demo_data / "val.jsonl").read_text().splitlines()[::5]]
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    path.write_text(
        "".join(json.dumps({**r, "image_path": str(demo_data / r["image_path"])}) + "\n" for r in rows)
    )
    return path

"""The rows of the JSONL files: read and checked once per run, cached on disk, held as arrays.

An ImageNet-size list (1.28 M rows) used to cost every rank minutes and ~0.5 KB of Python objects per row
before step 1. Here one process checks the rows (in a pool of processes, to the level ``data.check_images``
asks), the result is cached keyed by each JSONL's path, size and mtime, the datasets and the check level, and
every rank holds it as a few numpy arrays: no per-row Python object, so the pages DataLoader workers share
with their parent stay shared (reference counts of per-row objects would copy them page by page).

Imports numpy and PIL only (torch.distributed when several processes share the result).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import stat
import time
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from qwen_cls.config import DatasetConfig
from qwen_cls.console import tell
from qwen_cls.errors import ConfigError, DataError, QwenClsError

CheckLevel = Literal["header", "exists", "none"]
SHOWN_ERRORS = 20  # bad rows named in the one error; the rest are counted
CHUNK_BYTES = 4 << 20  # of JSONL per task of the checking pool: ~40 k rows of ~100 bytes
CACHE_FORMAT = 1  # bumped whenever what a cache file holds changes
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses a longer side over 200 times the shorter


def image_size_problem(width: int, height: int) -> str | None:
    """Why the model's processor would refuse an image of this size, or None."""
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        return (
            f"{width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; the Qwen-VL processor takes at most "
            f"{MAX_ASPECT_RATIO}:1 (crop or pad it)"
        )
    return None


@dataclass(frozen=True)
class Row:
    """One row, made on demand from a :class:`RowIndex`."""

    image_path: Path
    label: int
    dataset_idx: int
    source: str  # "file:line", for errors found while loading


class RowIndex:
    """Rows as arrays. Per row: int32 label, int16 dataset, int32 file and line, int64 offset into one byte
    buffer of the image paths as the JSONL wrote them (relative ones are joined to their file's folder on
    access) — 22 bytes plus the path's."""

    def __init__(
        self,
        labels: np.ndarray,
        dataset_idx: np.ndarray,
        paths: np.ndarray,
        offsets: np.ndarray,
        file_idx: np.ndarray,
        lines: np.ndarray,
        files: list[str],
    ):
        self.labels, self.dataset_idx, self.paths, self.offsets = labels, dataset_idx, paths, offsets
        self.file_idx, self.lines, self.files = file_idx, lines, files
        self._bases = [os.path.dirname(os.path.abspath(f)) for f in files]

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        written = self.paths[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()
        return os.path.join(self._bases[self.file_idx[i]], written)

    def source(self, i: int) -> str:
        return f"{self.files[self.file_idx[i]]}:{self.lines[i]}"

    def __getitem__(self, i: int) -> Row:
        return Row(Path(self.path(i)), int(self.labels[i]), int(self.dataset_idx[i]), self.source(i))

    def __iter__(self) -> Iterator[Row]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: Sequence[int] | np.ndarray) -> RowIndex:
        """These rows, in this order (the path buffer is rebuilt, so the subset is as compact)."""
        idx = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        spans = [self.paths[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
        paths = np.concatenate(spans) if spans else np.zeros(0, dtype=np.uint8)
        return RowIndex(
            self.labels[idx],
            self.dataset_idx[idx],
            paths,
            offsets,
            self.file_idx[idx],
            self.lines[idx],
            self.files,
        )

    def nbytes(self) -> int:
        arrays = (self.labels, self.dataset_idx, self.paths, self.offsets, self.file_idx, self.lines)
        return sum(a.nbytes for a in arrays)

    def digest(self) -> str:
        """Equal on two processes exactly when they hold the same rows in the same order."""
        h = hashlib.blake2b(digest_size=16)
        for array in (self.labels, self.dataset_idx, self.paths, self.offsets):
            h.update(np.ascontiguousarray(array).data)
        return h.hexdigest()

    def per_file(self) -> list[dict]:
        """Per file, in order: its name, row count and a digest of its rows (paths as written, labels, datasets),
        for rows held in file order as read; one pass over the arrays, no row objects."""
        record = []
        for i, file in enumerate(self.files):
            lo, hi = np.searchsorted(self.file_idx, [i, i + 1])
            h = hashlib.blake2b(digest_size=16)
            for array in (
                self.labels[lo:hi],
                self.dataset_idx[lo:hi],
                self.paths[self.offsets[lo] : self.offsets[hi]],
                self.offsets[lo : hi + 1] - self.offsets[lo],
            ):
                h.update(np.ascontiguousarray(array).data)
            record.append({"file": file, "rows": int(hi - lo), "digest": h.hexdigest()})
        return record

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "labels": self.labels,
            "dataset_idx": self.dataset_idx,
            "paths": self.paths,
            "offsets": self.offsets,
            "file_idx": self.file_idx,
            "lines": self.lines,
        }


def _as_list(paths) -> list[str | os.PathLike]:
    if paths is None:
        return []
    return [paths] if isinstance(paths, str | os.PathLike) else list(paths)


# ---- checking: one task per ~4 MB of a JSONL, in a pool of processes ----


@dataclass
class _Task:
    file: str
    start: int
    end: int
    names: tuple[str, ...]
    num_classes: tuple[int, ...]
    check: str


@dataclass
class _Checked:
    """One task's good rows as arrays (line numbers count from the task's first line, 0), its first bad rows'
    messages and how many it had."""

    labels: np.ndarray
    dataset_idx: np.ndarray
    lines: np.ndarray
    paths: bytes
    path_lengths: np.ndarray
    errors: list[tuple[int, str]]
    bad: int
    newlines: int


class _BadRow(Exception):
    pass


def _check_task(task: _Task) -> _Checked:
    with open(task.file, "rb") as fh:
        fh.seek(task.start)
        data = fh.read(task.end - task.start)
    base = os.path.dirname(os.path.abspath(task.file))
    labels, datasets, lines, paths, errors, bad = [], [], [], [], [], 0
    for j, raw in enumerate(data.split(b"\n")):
        try:
            text = _decode(raw, first=task.start == 0 and j == 0)
            if not text.strip():
                continue
            written, label, dataset = _parse(text, task.names, task.num_classes)
            _check_image(os.path.join(base, written), task.check)
        except _BadRow as e:
            bad += 1
            if len(errors) < SHOWN_ERRORS:
                errors.append((j, str(e)))
            continue
        labels.append(label)
        datasets.append(dataset)
        lines.append(j)
        paths.append(written.encode())
    return _Checked(
        np.array(labels, dtype=np.int32),
        np.array(datasets, dtype=np.int16),
        np.array(lines, dtype=np.int32),
        b"".join(paths),
        np.array([len(p) for p in paths], dtype=np.int64),
        errors,
        bad,
        data.count(b"\n"),
    )


def _decode(raw: bytes, first: bool) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")  # a BOM is fine
    except UnicodeDecodeError as e:
        raise _BadRow(
            f"not UTF-8 text ({e.reason}, byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def local_image_path(image: str) -> str:
    """An image path as a JSONL row may write it: absolute, relative to the file, ``~/...`` or ``file://``.
    Remote URLs are a ``ValueError`` that says so (joined to the JSONL's folder they would be "not found")."""
    if image.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(image).path)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", image)
    if scheme:
        raise ValueError(
            f"{scheme[1]}:// images are not supported: download them and give local paths (absolute, relative to "
            "the JSONL file, ~/... or file://)"
        )
    return os.path.expanduser(image) if image.startswith("~") else image


def _parse(line: str, names: tuple[str, ...], num_classes: tuple[int, ...]) -> tuple[str, int, int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRow(f"malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
    image = obj.get("image_path", obj.get("image"))
    if not isinstance(image, str) or not image:
        raise _BadRow("missing 'image_path' (or 'image')")
    try:
        image = local_image_path(image)
    except ValueError as e:
        raise _BadRow(str(e)) from None
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise _BadRow(f"'label' must be an integer, got {label!r}")
    dataset = obj.get("dataset_name", obj.get("dataset"))
    if dataset is None:
        if len(names) != 1:
            raise _BadRow(f"missing 'dataset_name' (several datasets are configured: {', '.join(names)})")
        dataset = names[0]
    if dataset not in names:
        raise _BadRow(
            f"unknown dataset {dataset!r}; add it to datasets.dataset_configs (known: {', '.join(names)})"
        )
    idx = names.index(dataset)
    if not 0 <= label < num_classes[idx]:
        raise _BadRow(f"label {label} out of range for dataset {dataset!r} (0..{num_classes[idx] - 1})")
    return image, label, idx


def _check_image(path: str, level: str) -> None:
    """``exists``: one stat; ``header``: also the image header (format and size, no pixels decoded)."""
    if level == "none":
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _BadRow(f"image not found: {path}") from None
    except OSError as e:
        raise _BadRow(f"cannot read image {path} ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _BadRow(f"{path} is a folder, not an image")
    if level == "exists":
        return
    try:
        with Image.open(path) as im:
            problem = image_size_problem(*im.size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _BadRow(f"not a readable image: {path} ({e})") from None
    if problem:
        raise _BadRow(f"{path}: {problem}")


def _tasks(file: Path, chunk_bytes: int, names, num_classes, check: str) -> list[_Task]:
    """Byte ranges of about ``chunk_bytes``, each ending after a newline (or at the end of the file)."""
    size = file.stat().st_size
    tasks, start = [], 0
    with file.open("rb") as fh:
        while start < size:
            end = min(size, start + chunk_bytes)
            if end < size:
                fh.seek(end)
                end += len(fh.readline())
            tasks.append(_Task(str(file), start, end, names, num_classes, check))
            start = end
    return tasks or [_Task(str(file), 0, 0, names, num_classes, check)]


def pool_size(tasks: int) -> int:
    """Processes for the checks: the cores this process may use, at most 32, at most one per task."""
    return max(1, min(tasks, len(os.sched_getaffinity(0)), 32))


@contextmanager
def _mapper(processes: int) -> Iterator[Callable]:
    """``map`` in order, here or in a pool of processes (fork: the children only read files and headers and
    start in milliseconds, where spawn would import torch again in each)."""
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():  # no fork: checked here
        yield map
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield pool.imap


def read_rows(
    jsonl_files,
    dataset_configs: dict[str, DatasetConfig],
    check: CheckLevel = "header",
    chunk_bytes: int = CHUNK_BYTES,
    processes: int | None = None,
) -> RowIndex:
    """Parse and check every row of the files, in order. Bad rows raise one ``DataError`` naming the first
    :data:`SHOWN_ERRORS` by ``file:line`` and counting the rest."""
    files = [Path(f) for f in _as_list(jsonl_files)]
    for file in files:
        if file.is_dir():
            raise DataError(f"{file}: a folder; give the JSONL file(s) in it")
        if not file.is_file():
            raise DataError(f"{file}: data file not found")
    names = tuple(dataset_configs)
    num_classes = tuple(cfg.num_classes for cfg in dataset_configs.values())
    per_file = [_tasks(f, chunk_bytes, names, num_classes, check) for f in files]
    tasks = [t for ts in per_file for t in ts]
    parts: list[tuple[int, int, _Checked]] = []  # (file, its first line's number - 1, rows)
    errors: list[str] = []
    bad = 0
    with _mapper(pool_size(len(tasks)) if processes is None else processes) as mapper:
        results = mapper(_check_task, tasks)
        for i, (file, file_tasks) in enumerate(zip(files, per_file, strict=True)):
            line_base, rows_before, bad_before = 0, len(parts), bad
            for _ in file_tasks:
                got = next(results)
                parts.append((i, line_base, got))
                errors += [f"{file}:{line_base + j + 1}: {m}" for j, m in got.errors][
                    : SHOWN_ERRORS - len(errors)
                ]
                bad += got.bad
                line_base += got.newlines
            if bad == bad_before and not any(len(p[2].labels) for p in parts[rows_before:]):
                raise DataError(f"{file}: no rows")
    if bad:
        raise DataError(_bad_rows_message(errors, bad))
    offsets = np.zeros(sum(len(p.labels) for _, _, p in parts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate([p.path_lengths for _, _, p in parts]), out=offsets[1:])
    return RowIndex(
        np.concatenate([p.labels for _, _, p in parts]),
        np.concatenate([p.dataset_idx for _, _, p in parts]),
        np.frombuffer(b"".join(p.paths for _, _, p in parts), dtype=np.uint8).copy(),
        offsets,
        np.concatenate([np.full(len(p.labels), i, dtype=np.int32) for i, _, p in parts]),
        np.concatenate([p.lines + (base + 1) for _, base, p in parts]),
        [str(f) for f in files],
    )


def _bad_rows_message(shown: list[str], total: int) -> str:
    if total == 1:
        return shown[0]
    more = f"\n  ... and {total - len(shown):,} more" if total > len(shown) else ""
    return f"{total:,} bad rows; fix or remove them:\n  " + "\n  ".join(shown) + more


# ---- the cache ----


def default_cache_dir() -> Path:
    """``$QWEN_CLS_CACHE``, else ``$XDG_CACHE_HOME/qwen-cls``, else ``~/.cache/qwen-cls``."""
    if os.environ.get("QWEN_CLS_CACHE"):
        return Path(os.environ["QWEN_CLS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-cls"


class RowCache:
    """The cache file of one list of JSONL files. Its name is a hash of everything the rows depend on (each
    file's resolved path, size and mtime; dataset names and num_classes; the check level), so a changed input
    is never served a stale result; the same key is also stored inside and compared on load."""

    def __init__(self, jsonl_files, dataset_configs: dict[str, DatasetConfig], check: str, cache_dir=None):
        self.jsonl_files, self.dataset_configs, self.check = jsonl_files, dataset_configs, check
        stats = []
        for file in _as_list(jsonl_files):
            try:
                st = os.stat(file)
            except OSError:
                raise DataError(f"{file}: data file not found") from None
            stats.append([str(Path(file).resolve()), st.st_size, st.st_mtime_ns])
        self.key = json.dumps(
            {
                "format": CACHE_FORMAT,
                "check": check,
                "datasets": [[name, cfg.num_classes] for name, cfg in dataset_configs.items()],
                "files": stats,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:32]
        self.path = Path(cache_dir or default_cache_dir()).expanduser() / "rows" / f"{digest}.npz"

    def load(self) -> RowIndex | None:
        """The cached rows, or None when there are none; an unreadable or foreign file is rebuilt, with a warning."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(arrays.pop("meta").tobytes())
            if meta["key"] != self.key:
                raise ValueError("written for other files")
            # the files as named now: relative image paths follow the JSONL, whatever folder the cache was written from
            rows = RowIndex(**arrays, files=[str(f) for f in _as_list(self.jsonl_files)])
            n = len(rows.labels)
            if not (
                len(rows.dataset_idx) == len(rows.file_idx) == len(rows.lines) == n
                and len(rows.offsets) == n + 1
                and rows.offsets[-1] == len(rows.paths)
            ):
                raise ValueError("its arrays disagree")
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"{self.path}: unreadable row cache ({e}); checking the rows again", stacklevel=2)
            return None
        return rows

    def save(self, rows: RowIndex) -> None:
        """Written beside its final name, then renamed: a reader sees no file or a whole one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        meta = json.dumps({"key": self.key, "files": rows.files}).encode()
        try:
            np.savez(tmp, meta=np.frombuffer(meta, dtype=np.uint8), **rows._arrays())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_or_build(self, must_save: bool = False) -> RowIndex:
        rows = self.load()
        if rows is not None:
            tell(f"{len(rows):,} rows of {self._names()} from the cache ({self.check} check): {self.path}")
            return rows
        start = time.perf_counter()
        rows = read_rows(self.jsonl_files, self.dataset_configs, self.check)
        took = time.perf_counter() - start
        try:
            self.save(rows)
            where = f"cached in {self.path}"
        except OSError as e:
            if must_save:  # the other processes read the result from there
                raise ConfigError(
                    f"data.index_cache_dir: cannot write {self.path} ({e.strerror}); the processes of a run share "
                    "the checked rows through it: choose a writable folder"
                ) from None
            where = f"not cached ({self.path}: {e.strerror})"
        tell(f"checked {len(rows):,} rows of {self._names()} ({self.check} check) in {took:.1f} s; {where}")
        return rows

    def _names(self) -> str:
        return ", ".join(Path(f).name for f in _as_list(self.jsonl_files))


# ---- one check per run ----


def shared_rows(
    jsonl_files,
    dataset_configs: dict[str, DatasetConfig],
    check: CheckLevel = "header",
    cache_dir: str | os.PathLike | None = None,
    rank: int = 0,
    local_rank: int = 0,
    world_size: int = 1,
) -> RowIndex:
    """The rows, checked by one process of the run; every process gets the same ones.

    Global rank 0 checks (or finds them cached) and writes the cache; the first process of every other node
    then looks for that file: found, the node shares rank 0's result (the data and the cache are on a shared
    filesystem); not found (a node-local cache folder, or node-local copies of the data with their own mtimes),
    that process checks its node's copy and caches it for its node. The other processes load the cache.
    Finally every process compares a digest of its rows: no rank trains on rows another rejected or lacks.
    An error in any process stops all of them with its message (collectives at start-up only).
    """
    import torch.distributed as dist

    def cache() -> RowCache:
        return RowCache(jsonl_files, dataset_configs, check, cache_dir)

    if world_size == 1 or not dist.is_initialized():
        return cache().load_or_build()

    rows: RowIndex | None = None
    error: QwenClsError | None = None

    def attempt(step: Callable[[], RowIndex | None]) -> None:
        nonlocal rows, error
        try:
            rows = step()
        except QwenClsError as e:
            error = e

    if rank == 0:
        attempt(lambda: cache().load_or_build(must_save=True))
    first = [error]
    dist.broadcast_object_list(first, src=0)
    _raise_first(first)
    if rank != 0 and local_rank == 0:
        attempt(lambda: _mine(cache()))
    _raise_first(_gathered(error, world_size))
    if rows is None:
        attempt(lambda: _cached(cache()))
    _raise_first(_gathered(error, world_size))
    digests = _gathered(rows.digest(), world_size)
    if len(set(digests)) > 1:
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        raise DataError(
            f"{', '.join(map(str, _as_list(jsonl_files)))}: the rows differ between processes (rank 0 and rank "
            f"{other}): the nodes' copies of the data differ; make them equal, or put the data on a shared filesystem"
        )
    return rows


def _mine(cache: RowCache) -> RowIndex:
    """Another node's first process: rank 0's result when this node sees it, else its own check."""
    rows = cache.load()
    return rows if rows is not None else cache.load_or_build(must_save=True)


def _cached(cache: RowCache) -> RowIndex:
    rows = cache.load()
    if rows is None:
        raise ConfigError(
            f"data.index_cache_dir: {cache.path} was written by this node's first process but this one cannot "
            "read it; every process of a node needs to see the same cache folder"
        )
    return rows


def _gathered(obj, world_size: int) -> list:
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _raise_first(errors: list) -> None:
    for e in errors:
        if e is not None:
            raise e

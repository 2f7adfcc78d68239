"""Rows checked once: all bad rows in one error, the check levels, the pool, the cache, and several processes
sharing one check (the 2-process fit that proves it is in test_scale.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from qwen_cls import rows as rows_module
from qwen_cls.config import DatasetConfig
from qwen_cls.errors import DataError
from qwen_cls.rows import SHOWN_ERRORS, RowCache, read_rows, shared_rows

MNIST = {"mnist": DatasetConfig(num_classes=10)}


def relative_rows(demo_data: Path, tmp_path: Path, n: int = 300) -> Path:
    """The first N demo rows, written relative to a JSONL in another folder."""
    lines = (demo_data / "train.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line.replace('"images/', f'"{demo_data}/images/') + "\n" for line in lines))
    return path


@pytest.fixture
def count_checks(monkeypatch) -> list[str]:
    """The image paths the start-up check looks at (this process only)."""
    seen: list[str] = []
    real = rows_module._check_image

    def counted(path: str, level: str) -> None:
        seen.append(path)
        real(path, level)

    monkeypatch.setattr(rows_module, "_check_image", counted)
    return seen


def test_thirty_bad_rows_are_one_error_naming_twenty_and_counting_the_rest(demo_data, tmp_path):
    path = relative_rows(demo_data, tmp_path, 100)
    lines = path.read_text().splitlines()
    bad_at = list(range(5, 95, 3))  # 30 rows, line numbers 6, 9, ... 93
    for i in bad_at:
        lines[i] = json.dumps({"image_path": lines[i], "label": 99})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_rows(path, MNIST)
    message = str(err.value).splitlines()
    assert message[0] == "30 bad rows; fix or remove them:"
    named = [line.strip() for line in message[1:-1]]
    assert len(named) == SHOWN_ERRORS == 20
    assert named == [f"{path}:{i + 1}: label 99 out of range for dataset 'mnist' (0..9)" for i in bad_at[:20]]
    assert message[-1] == "  ... and 10 more"


def test_a_folder_or_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: a folder; give the JSONL file"):
        read_rows(tmp_path, MNIST)
    with pytest.raises(DataError, match="gone.jsonl: data file not found"):
        shared_rows(tmp_path / "gone.jsonl", MNIST, "header", tmp_path / "cache")


def test_one_bad_row_stays_one_line(demo_data, tmp_path):
    path = relative_rows(demo_data, tmp_path, 10)
    path.write_text(path.read_text() + '{"image_path": "x.png"\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:11: malformed JSON \(.*\)$"):
        read_rows(path, MNIST)


def test_rows_are_arrays_of_a_few_bytes_plus_the_path(demo_data, tmp_path):
    path = relative_rows(demo_data, tmp_path)
    rows = read_rows(path, MNIST)
    written = [json.loads(line)["image_path"] for line in path.read_text().splitlines()]
    assert len(rows) == 300 and rows.paths.nbytes == sum(len(p.encode()) for p in written)
    assert rows.nbytes() == 22 * 300 + 8 + rows.paths.nbytes
    row = rows[7]
    assert (row.image_path, row.label, row.source) == (
        Path(written[7]),
        json.loads(path.read_text().splitlines()[7])["label"],
        f"{path}:8",
    )


def test_the_checking_pool_gives_the_rows_and_line_numbers_of_one_process(demo_data, tmp_path):
    path = relative_rows(demo_data, tmp_path, 3000)
    lines = path.read_text().splitlines()
    lines[2500] = "[]"
    lines[10] = '{"image_path": "missing.png", "label": 1}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    inline = read_rows(path, MNIST, processes=1)
    pooled = read_rows(path, MNIST, chunk_bytes=4096, processes=2)  # ~60 tasks over 2 processes
    for name in ("labels", "dataset_idx", "paths", "offsets", "file_idx", "lines"):
        assert np.array_equal(getattr(inline, name), getattr(pooled, name)), name
    with pytest.raises(DataError) as err:
        read_rows(tmp_path / "bad.jsonl", MNIST, chunk_bytes=4096, processes=2)
    named = [line.strip().split(": ")[0] for line in str(err.value).splitlines()[1:]]
    assert named == [f"{tmp_path / 'bad.jsonl'}:11", f"{tmp_path / 'bad.jsonl'}:2501"]


def test_check_levels(demo_data, tmp_path, count_checks):
    not_image = tmp_path / "notes.png"
    not_image.write_text("text, not a PNG")
    good = json.dumps({"image_path": str(demo_data / "images" / "00000.png"), "label": 0})
    path = tmp_path / "rows.jsonl"
    for bad, failing_levels in (
        ({"image_path": str(not_image), "label": 0}, {"header"}),
        ({"image_path": "gone.png", "label": 0}, {"header", "exists"}),
        ({"image_path": str(tmp_path), "label": 0}, {"header", "exists"}),
        ({"image_path": str(not_image), "label": 10}, {"header", "exists", "none"}),  # the row itself
    ):
        path.write_text(good + "\n" + json.dumps(bad) + "\n")
        for level in ("header", "exists", "none"):
            if level in failing_levels:
                with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: "):
                    read_rows(path, MNIST, check=level)
            else:
                assert len(read_rows(path, MNIST, check=level)) == 2
    assert not_image.exists()


def test_the_cache_serves_unchanged_files_and_rebuilds_on_any_change(demo_data, tmp_path, count_checks):
    path = relative_rows(demo_data, tmp_path)
    cache = tmp_path / "cache"

    def rows(configs=MNIST, check="header"):
        count_checks.clear()
        return shared_rows(path, configs, check, cache), len(count_checks)

    first, checks = rows()
    assert checks == 300
    again, checks = rows()
    assert checks == 0 and again.digest() == first.digest() and list(again) == list(first)

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # touched
    assert rows()[1] == 300
    assert rows({"mnist": DatasetConfig(num_classes=12)})[1] == 300
    assert rows(check="exists")[1] == 300
    assert rows(check="exists")[1] == 0
    assert len(list((cache / "rows").glob("*.npz"))) == 4  # one per key; no temporary file left

    cached = RowCache(path, MNIST, "header", cache).path
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated, e.g. a full disk
    with pytest.warns(UserWarning, match="unreadable row cache"):
        rebuilt, checks = rows()
    assert checks == 300 and rebuilt.digest() == first.digest()
    assert rows()[1] == 0  # and written whole again


def test_cached_rows_follow_the_jsonl_as_named_now(demo_data, tmp_path, monkeypatch, count_checks):
    """A cache written for ``data/train.jsonl`` from one folder serves the same file named ``../data/train.jsonl``
    from another: relative image paths resolve against the JSONL, not the folder the cache was written from."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(demo_data / "images")
    (data / "train.jsonl").write_text(
        "\n".join((demo_data / "train.jsonl").read_text().splitlines()[:50]) + "\n"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    first = shared_rows("data/train.jsonl", MNIST, "header", tmp_path / "cache")
    assert len(count_checks) == 50
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = shared_rows("../data/train.jsonl", MNIST, "header", tmp_path / "cache")
    assert len(count_checks) == 50  # served from the cache
    assert again.digest() == first.digest()
    assert all(row.image_path.is_file() for row in again)
    assert again[0].source == "../data/train.jsonl:1"


def test_an_unwritable_cache_folder_only_costs_the_cache(demo_data, tmp_path, capsys):
    path = relative_rows(demo_data, tmp_path, 5)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert len(shared_rows(path, MNIST, "header", blocker)) == 5
    assert "not cached" in capsys.readouterr().out


# ---- several processes (gloo, spawned): the node logic without a cluster ----


def _process(rank: int, port: int, out: str, scenarios: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seen: list[str] = []
    real = rows_module._check_image
    rows_module._check_image = lambda path, level: (seen.append(path), real(path, level))[1]
    results = []
    for scenario in scenarios:
        mine = scenario[rank]
        seen.clear()
        try:
            got = shared_rows(mine["jsonl"], MNIST, "header", mine["cache"], rank, mine["local_rank"], 2)
            results.append({"rows": len(got), "digest": got.digest(), "checks": len(seen)})
        except DataError as e:
            results.append({"error": str(e), "checks": len(seen)})
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_processes_share_one_check_or_each_node_checks_its_own_copy(demo_data, tmp_path):
    path = relative_rows(demo_data, tmp_path, 200)
    other_copy = tmp_path / "node1" / "train.jsonl"  # node 1's copy of the list, one label different
    other_copy.parent.mkdir()
    lines = path.read_text().splitlines()
    row = json.loads(lines[7])
    lines[7] = json.dumps({**row, "label": 9 - row["label"]})
    other_copy.write_text("\n".join(lines) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"label": 1}\n')

    def node(jsonl, cache, local_rank):
        return {"jsonl": str(jsonl), "cache": str(tmp_path / cache), "local_rank": local_rank}

    scenarios = [
        [node(path, "shared", 0), node(path, "shared", 1)],  # one node: rank 0 checks, rank 1 reads its cache
        [node(path, "shared", 0), node(path, "node1", 0)],  # node 1 cannot see rank 0's cache: checks its own
        [node(path, "shared", 0), node(other_copy, "node1b", 0)],  # node 1's copy of the data differs
        [node(bad, "shared", 0), node(bad, "shared", 1)],  # a bad row stops both processes
    ]
    out = tmp_path / "out"
    out.mkdir()
    port = 29000 + os.getpid() % 1000
    torch_mp.start_processes(_process, args=(port, str(out), scenarios), nprocs=2, start_method="spawn")
    zero, one = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))

    assert (zero[0]["checks"], one[0]["checks"]) == (200, 0)
    assert zero[0]["rows"] == one[0]["rows"] == 200 and zero[0]["digest"] == one[0]["digest"]
    assert (zero[1]["checks"], one[1]["checks"]) == (0, 200)  # rank 0: cached by the first scenario
    assert zero[1]["digest"] == one[1]["digest"] == zero[0]["digest"]
    differ = "the rows differ between processes (rank 0 and rank 1): the nodes' copies of the data differ"
    assert zero[2]["error"].startswith(f"{path}: {differ}") and one[2]["error"].startswith(
        f"{other_copy}: {differ}"
    )
    assert zero[3]["error"] == one[3]["error"] == f"{bad}:201: missing 'image_path' (or 'image')"
    assert one[3]["checks"] == 0

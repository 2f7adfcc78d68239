"""Start-up cost of million-row datasets (`make bench`). Prints; asserts nothing.

Synthetic JSONL lists of 10 k, 100 k and 1 M rows over the 5,000 demo PNGs (absolute paths, ~45 bytes each),
each measured in a fresh process, for ``data.check_images`` = header / exists / none:

- first start: the rows read and checked (the checking pool on every core), then cached;
- cached start: what a rerun or a resume pays, in a new process;
- memory a process holds for the rows: RSS after loading them from the cache, minus before, per row; beside
  it, the same rows as the list of per-row ``Row`` objects the previous implementation held;
- a DataLoader worker after one epoch of index reads (path and label of every row, no decoding): its private
  memory (USS) grown since its first item, for the arrays and for the list of objects (whose reference counts
  copy the parent's pages into the worker as they are touched).

    python bench/data_startup.py [--rows 10000 100000 1000000] [--levels header exists none]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qwen_cls.data import export_demo_data

MNIST = {"mnist": {"num_classes": 10}}


def write_rows(folder: Path, images: list[str], n: int) -> Path:
    path = folder / f"rows-{n}.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"image_path": images[i % len(images)], "label": i % 10}) + "\n")
    return path


CHILD = r"""
import json, sys, time, psutil
from qwen_cls.config import DatasetConfig
from qwen_cls.rows import shared_rows
jsonl, level, cache, what = sys.argv[1:5]
configs = {"mnist": DatasetConfig(num_classes=10)}
proc = psutil.Process()
before = proc.memory_info().rss
start = time.perf_counter()
rows = shared_rows(jsonl, configs, level, cache)
took = time.perf_counter() - start
held = proc.memory_info().rss - before
out = {"seconds": took, "rss": held, "rows": len(rows), "path_bytes": int(rows.paths.nbytes)}
if what == "memory":
    import gc
    objects_before = proc.memory_info().rss
    as_objects = list(rows)
    gc.collect()
    out["objects_rss"] = proc.memory_info().rss - objects_before
if what == "worker":
    from torch.utils.data import DataLoader, Dataset

    class IndexReads(Dataset):
        def __init__(self, source):
            self.source = source
        def __len__(self):
            return len(self.source)
        def __getitem__(self, i):
            if isinstance(self.source, list):
                row = self.source[i]
                path, label = str(row.image_path), row.label
            else:
                path, label = self.source.path(i), int(self.source.labels[i])
            return psutil.Process().memory_full_info().uss if i in (0, len(self) - 1) else len(path) + label

    for name, source in (("arrays", rows), ("objects", list(rows))):
        loader = DataLoader(IndexReads(source), batch_size=4096, num_workers=1, collate_fn=lambda b: (b[0], b[-1]))
        first = last = None
        for head, tail in loader:
            first = head if first is None else first
            last = tail
        out[f"worker_uss_growth_{name}"] = last - first
        del source
print(json.dumps(out))
"""


def child(jsonl: Path, level: str, cache: Path, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(jsonl), level, str(cache), what], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--levels", nargs="+", default=["header", "exists", "none"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen-cls-data-") as tmp:
        tmp = Path(tmp)
        demo = export_demo_data(tmp / "mnist")
        images = sorted(str(p) for p in (demo / "images").glob("*.png"))
        results = []
        for n in args.rows:
            jsonl = write_rows(tmp, images, n)
            for level in args.levels:
                cache = tmp / f"cache-{n}-{level}"
                first = child(jsonl, level, cache, "first")
                cached = child(jsonl, level, cache, "memory" if level == args.levels[0] else "cached")
                row = {"rows": n, "level": level, "first_s": first["seconds"], "cached_s": cached["seconds"]}
                row["rss_per_row"] = cached["rss"] / n
                row["path_bytes_per_row"] = cached["path_bytes"] / n
                if "objects_rss" in cached:
                    row["objects_rss_per_row"] = cached["objects_rss"] / n
                results.append(row)
                print(json.dumps(row), flush=True)
        worker = child(jsonl, args.levels[0], tmp / f"cache-{args.rows[-1]}-{args.levels[0]}", "worker")
    print("\n| rows | check | first start (s) | cached start (s) | held per row (B) | as Row objects (B) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        objects = f"{r['objects_rss_per_row']:.0f}" if "objects_rss_per_row" in r else ""
        print(
            f"| {r['rows']:,} | {r['level']} | {r['first_s']:.2f} | {r['cached_s']:.2f} | "
            f"{r['rss_per_row']:.0f} (paths {r['path_bytes_per_row']:.0f}) | {objects} |"
        )
    for level in args.levels:
        mine = [r for r in results if r["level"] == level]
        if len(mine) > 1:
            slope = np.polyfit([r["rows"] for r in mine], [r["first_s"] for r in mine], 1)[0]
            print(f"{level}: first start {slope * 1e6:.1f} s per million rows (slope of a linear fit)")
    largest = max(args.rows)
    print(
        f"DataLoader worker after one epoch of index reads over {largest:,} rows, private memory grown: arrays "
        f"{worker['worker_uss_growth_arrays'] / 2**20:.1f} MiB, list of Row objects "
        f"{worker['worker_uss_growth_objects'] / 2**20:.1f} MiB"
    )
    goals = {r["level"]: r for r in results if r["rows"] == largest}
    if "header" in goals:
        g = goals["header"]
        per_million = g["rss_per_row"] * 1e6 / 2**20
        print(
            f"goals at {largest:,} rows, header: first {g['first_s']:.1f} s (<= 60), cached {g['cached_s']:.2f} s "
            f"(<= 3), {per_million:.0f} MiB per million rows held (<= 150)"
        )


if __name__ == "__main__":
    main()

"""Read the history an offline W&B run wrote, from its ``run-<id>.wandb`` file.

The file is W&B's 7-byte header followed by LevelDB log blocks of protobuf ``Record`` messages; wandb
ships no reader for it any more, so the tests carry this one (about the size of the format).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7  # b":W&B", magic 0xBEE1, version
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, chunks = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too small for a header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            chunks = payload
        elif kind in (MIDDLE, LAST):
            chunks += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def _complete_records(run_file: Path, timeout: float = 60.0) -> list:
    """The file's records once W&B has written the run's exit record: wandb's service may still be
    writing for a moment after ``finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_records(Path(run_file).read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(run_file: Path) -> list[dict]:
    """Each ``wandb.log`` call as a dict of metric name -> value, in order."""
    rows = []
    for record in _complete_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            )
    return rows


def wandb_step_metrics(run_file: Path) -> dict[str, str]:
    """``define_metric`` declarations: metric name or glob -> its x-axis."""
    found = {}
    for record in _complete_records(run_file):
        if record.WhichOneof("record_type") == "metric" and record.metric.step_metric:
            found[record.metric.glob_name or record.metric.name] = record.metric.step_metric
    return found

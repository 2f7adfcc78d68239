"""Writing a benchmark's results: JSON under bench/results/ and a Markdown table on stdout."""

from __future__ import annotations

import json
from pathlib import Path


def report(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| measurement | value |\n| --- | --- |")
    for key, value in results.items():
        print(f"| {key} | {value} |")

"""JSON Lines, the one reader and writer of every `.jsonl` file the store holds (datasets,
metrics, feedback). Keys are sorted on write so equal records give equal bytes."""

from __future__ import annotations

import json
from pathlib import Path


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def read_jsonl(path: Path) -> list[dict]:
    """Files the store wrote itself; a user's file goes through resources/datasets/sources.py,
    which names the line and field of a bad record."""
    return [json.loads(line) for line in path.read_text().splitlines()]

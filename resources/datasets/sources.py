"""Dataset sources: seeded synthetic tasks, local JSONL/Parquet files, and HF datasets
through `datasets.load_dataset`. Every record is validated on the way in, and a bad one
fails with the file, the record and the field, before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from dagster import Config
from pydantic import Field, NonNegativeInt

from resources.datasets.synthetic import GENERATORS

ROLES = {"system", "user", "assistant", "tool"}
# No single training example is this large; a line longer than this is a wrong file (or a
# missing newline), and reading it whole could exhaust memory, so it is refused unread.
MAX_RECORD_BYTES = 16 << 20


class DatasetError(ValueError):
    """Bad input data; the message names file, record and field."""


Generator = Literal[tuple(GENERATORS)]  # the synthetic task names


class DatasetConfig(Config):
    source: Literal["synthetic", "jsonl", "parquet", "hf"] = "synthetic"
    generator: Generator = Field(default="arithmetic", description="synthetic: which seeded task")
    path: str = Field(default="", description="local file (jsonl/parquet) or dataset id / builder name (hf)")
    hf_name: str = Field(default="", description="hf: dataset config name")
    hf_split: str = Field(default="train", description="hf: split to load")
    hf_revision: str = Field(default="", description="hf: git revision to pin")
    data_files: list[str] = Field(default=[], description="hf: data files (e.g. local json/parquet)")
    num_examples: NonNegativeInt = Field(default=2000, description="synthetic: records to generate; files: cap (0 = all)")
    test_fraction: float = Field(default=0.1, description="held-out share, chosen by a seeded shuffle")
    seed: int = 0


def load_records(cfg: DatasetConfig, validate: Callable[[Any, str, str], dict | None] | None = None) -> list[dict]:
    """`validate(record, origin, where)` normalizes one record (None drops it) or raises
    DatasetError; the default accepts conversations and documents."""
    validate = validate or validate_record
    if cfg.source == "synthetic":
        if cfg.num_examples < 2:
            raise DatasetError(f"dataset config: field 'num_examples': {cfg.num_examples} is < 2")
        return GENERATORS[cfg.generator](cfg.num_examples, cfg.seed)
    raw = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}[cfg.source](cfg)
    origin = ",".join(cfg.data_files) or cfg.path
    records = [r for r in (validate(r, origin, where) for where, r in raw) if r is not None]
    if cfg.num_examples and cfg.source != "hf":
        records = records[: cfg.num_examples]
    if not records:
        raise DatasetError(f"{origin}: no records")
    return records


def _read_jsonl(cfg: DatasetConfig) -> Iterable[tuple[str, Any]]:
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if len(line) > MAX_RECORD_BYTES:
                raise DatasetError(f"{path}: line {lineno}: record longer than {MAX_RECORD_BYTES >> 20} MiB; "
                                   "is this a JSONL file with one record per line?")
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_parquet(cfg: DatasetConfig) -> Iterable[tuple[str, Any]]:
    import pyarrow.parquet as pq

    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{path}: unreadable Parquet ({e})") from None
    return ((f"row {i}", r) for i, r in enumerate(rows))


def _read_hf(cfg: DatasetConfig) -> Iterable[tuple[str, Any]]:
    import datasets

    ds = datasets.load_dataset(
        cfg.path,
        cfg.hf_name or None,
        split=cfg.hf_split,
        data_files=cfg.data_files or None,
        revision=cfg.hf_revision or None,
    )
    if cfg.num_examples:
        ds = ds.select(range(min(cfg.num_examples, len(ds))))
    return ((f"row {i}", r) for i, r in enumerate(ds))


def validate_record(record: Any, origin: str, where: str) -> dict:
    """A record is a conversation (`messages`) or a document (`text`); keep only those fields."""

    def fail(field: str, problem: str) -> DatasetError:
        return DatasetError(f"{origin}: {where}: field {field!r}: {problem}")

    if not isinstance(record, dict):
        raise DatasetError(f"{origin}: {where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise fail("messages", "expected a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise fail(f"messages[{i}]", f"expected an object, got {type(m).__name__}")
            for key in ("role", "content"):
                if key not in m:
                    raise fail(f"messages[{i}].{key}", "missing")
            content = _text_content(m["content"], lambda problem: fail(f"messages[{i}].content", problem))
            if not isinstance(m["role"], str):
                raise fail(f"messages[{i}].role", f"expected a string, got {type(m['role']).__name__}")
            if m["role"] not in ROLES:
                raise fail(f"messages[{i}].role", f"unknown role {m['role']!r} (expected one of {sorted(ROLES)})")
            clean.append({"role": m["role"], "content": content})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
            raise fail("messages", "no non-empty assistant message to train on")
        return {"messages": clean}
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise fail("text", f"expected a string, got {type(text).__name__}")
        if not text.strip():
            raise fail("text", "empty")
        return {"text": text}
    raise DatasetError(f"{origin}: {where}: missing field 'messages' or 'text'")


def _text_content(content: Any, fail) -> str:
    """A string, or OpenAI/tinker-style content parts of type text (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise fail(f"part {j}: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise fail(f"expected a string or a list of text parts, got {type(content).__name__}")


def split_records(records: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    import random

    if not 0 < test_fraction < 1 or math.isnan(test_fraction):
        raise DatasetError(f"dataset config: field 'test_fraction': {test_fraction} is not in (0, 1)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(records) * test_fraction))
    if n_test >= len(records):
        raise DatasetError(f"dataset config: {len(records)} records leave nothing to train on after the test split")
    test_ids = set(order[:n_test])
    train = [r for i, r in enumerate(records) if i not in test_ids]
    test = [r for i, r in enumerate(records) if i in test_ids]
    return train, test

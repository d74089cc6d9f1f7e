"""Dataset sources: seeded synthetic tasks, local JSONL/Parquet files, and HF datasets
through `datasets.load_dataset`. Every record is validated on the way in, and a bad one
fails with the file, the record and the field, before anything is written."""

from __future__ import annotations

import codecs
import json
import os
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
OodGenerator = Literal[("", *GENERATORS)]  # '' = no out-of-distribution split


class DatasetConfig(Config):
    source: Literal["synthetic", "jsonl", "parquet", "hf"] = "synthetic"
    generator: Generator = Field(default="arithmetic", description="synthetic: which seeded task")
    path: str = Field(default="", description="local file (jsonl/parquet) or dataset id / builder name (hf)")
    hf_name: str = Field(default="", description="hf: dataset config name")
    hf_split: str = Field(default="train", description="hf: split to load")
    hf_revision: str = Field(default="", description="hf: git revision to pin")
    data_files: list[str] = Field(default=[], description="hf: data files (e.g. local json/parquet)")
    num_examples: NonNegativeInt = Field(default=2000, description="synthetic: records to generate; files: cap (0 = all)")
    test_fraction: float = Field(default=0.1, description="share of the distinct items (normalised prompt or question) "
                                                          "held out by a seeded shuffle; each is tested once, never trained on")
    ood_generator: OodGenerator = Field(default="", description="a synthetic task outside the training "
                                                      "distribution (e.g. operands never trained on): a third split, test_ood, "
                                                      "evaluated and reported apart from the gate; '' = none")
    ood_examples: NonNegativeInt = Field(default=1000, description="ood_generator: records to generate (each distinct item kept once)")
    seed: int = 0


def load_records(cfg: DatasetConfig, validate: Callable[[Any, str, str], dict | None] | None = None,
                 notes: list[str] | None = None, sources: list[str] | None = None) -> list[dict]:
    """`validate(record, origin, where)` normalizes one record (None drops it) or raises
    DatasetError; the default accepts conversations and documents. `notes`, when given,
    collects what the user should see that is not an error: `num_examples` asking for more
    records than the source has (it is a cap, so what there is gets used) and records the
    validator dropped. `sources`, when given, gets where each returned record came from
    ("/abs/file.jsonl: line 12"), in order, so later errors can name the user's own line.
    Local paths are shown resolved to absolute ones."""
    validate = validate or validate_record
    if cfg.source == "synthetic":
        if cfg.num_examples < 2:
            raise DatasetError(f"dataset config: field 'num_examples': {cfg.num_examples} is < 2")
        records = GENERATORS[cfg.generator](cfg.num_examples, cfg.seed)
        if sources is not None:
            sources += [f"synthetic {cfg.generator} (seed {cfg.seed}): record {i}" for i in range(1, len(records) + 1)]
        return records
    raw = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}[cfg.source](cfg)
    origin = _origin(cfg)
    records, kept_at, dropped = [], [], []
    for where, r in raw:
        clean = validate(r, origin, where)
        if clean is None:
            dropped.append(where)
        else:
            records.append(clean)
            kept_at.append(where)
    read = len(records) + len(dropped)
    reason = getattr(validate, "drops", "its validator returned None for them")
    if not records:
        raise DatasetError(f"{origin}: no records" + (f" (all {read} were dropped: {reason})" if read else ""))
    if dropped and notes is not None:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        notes.append(f"{origin}: {len(dropped)} of {read} records dropped ({reason}): {shown}")
    if cfg.num_examples and cfg.source != "hf":
        records = records[: cfg.num_examples]
    if sources is not None:
        sources += [f"{origin}: {where}" for where in kept_at[: len(records)]]
    # hf reads at most num_examples rows; fewer read means the split is smaller (drops are noted above)
    short = read < cfg.num_examples if cfg.source == "hf" else len(records) < cfg.num_examples
    if short and notes is not None:
        has = f"{len(records)} usable of {read}" if dropped else f"{read}"
        notes.append(f"num_examples {cfg.num_examples} asks for more records than {origin} has ({has}); "
                     f"using {len(records)}")
    return records


# builders of `datasets` whose data_files are local files (or URLs), not paths inside a hub repo
LOCAL_BUILDERS = {"json", "parquet", "csv", "text", "arrow"}


def _origin(cfg: DatasetConfig) -> str:
    """What error messages name: the absolute path of a local file, else the dataset id."""
    if cfg.source in ("jsonl", "parquet"):
        return str(_resolve(cfg.path)[0])
    if cfg.data_files and cfg.path in LOCAL_BUILDERS:
        return ",".join(f if "://" in f else str(_resolve(f)[0]) for f in cfg.data_files)
    return ",".join(cfg.data_files) or cfg.path


def _resolve(given: str) -> tuple[Path, str]:
    """The absolute path (`~` expanded, symlinks kept) and how to show it: a relative path is
    shown with the directory it was resolved against, which is where the process runs."""
    path = Path(given).expanduser()
    if path.is_absolute():
        return Path(os.path.abspath(path)), os.path.abspath(path)
    absolute = os.path.abspath(path)
    return Path(absolute), f"{given} (resolved against {os.getcwd()} as {absolute})"


def _local_file(cfg: DatasetConfig) -> Path:
    """The one local data file `cfg.path` names, or an error that says what it is instead."""
    kind = cfg.source
    if not cfg.path.strip():
        raise DatasetError(f"dataset config: field 'path': empty; source {kind!r} reads one local .{kind} file, name it")
    path, shown = _resolve(cfg.path)
    if path.is_dir():
        raise DatasetError(f"{shown}: is a directory, not a data file; name one .{kind} file in it{_listing(path, kind)}")
    if not path.exists():
        if path.is_symlink():
            raise DatasetError(f"{shown}: no such file (a symlink to {os.readlink(path)}, which does not exist)")
        raise DatasetError(f"{shown}: no such file")
    if not path.is_file():
        raise DatasetError(f"{shown}: not a regular file")
    return path


def _listing(directory: Path, kind: str) -> str:
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(f".{kind}"))
    except OSError:
        return ""
    if not names:
        return f" (it holds no .{kind} file)"
    listing = f" (it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
    if len(names) > 1:
        builder = "json" if kind == "jsonl" else kind
        listing += f"; to read several at once use source: hf, path: {builder}, data_files: [...]"
    return listing


def _sniff(head: bytes) -> str:
    """A hint for a file that is not what its source says, from its first bytes."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "; the file is UTF-16 (it starts with a UTF-16 byte-order mark): save it as UTF-8"
    if head.startswith(b"\x1f\x8b"):
        return "; the file is gzip-compressed: gunzip it first"
    if head.startswith(b"PAR1"):
        return "; the file is Parquet: set source: parquet"
    if head.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith((b"{", b"[")):
        return "; the file looks like JSON Lines: set source: jsonl"
    return ""


def _read_jsonl(cfg: DatasetConfig) -> Iterable[tuple[str, Any]]:
    path = _local_file(cfg)
    first = True  # no record yet
    with open(path, "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]  # editors on Windows write one; it is not part of the data
            if len(line) > MAX_RECORD_BYTES:
                raise DatasetError(f"{path}: line {lineno}: record longer than {MAX_RECORD_BYTES >> 20} MiB; "
                                   "is this a JSONL file with one record per line?")
            if not line.strip():
                continue
            hint = _sniff(line) if lineno == 1 and not line.lstrip().startswith((b"{", b"[")) else ""
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: not UTF-8 ({e.reason} at byte {e.start}){hint}") from None
            except json.JSONDecodeError as e:
                if first and line.strip() in (b"{", b"["):
                    hint = "; JSONL holds one whole JSON object per line (this looks like pretty-printed JSON)"
                raise DatasetError(f"{path}: line {lineno}: malformed JSON ({e.msg} at column {e.colno}){hint}") from None
            if first and isinstance(record, list) and record and all(isinstance(r, dict) for r in record):
                raise DatasetError(f"{path}: line {lineno}: expected a JSON object, got a list of {len(record)} objects; "
                                   "JSONL holds one object per line, not a JSON array")
            first = False
            yield f"line {lineno}", record


def _read_parquet(cfg: DatasetConfig) -> Iterable[tuple[str, Any]]:
    import pyarrow.parquet as pq

    path = _local_file(cfg)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        with open(path, "rb") as f:
            hint = _sniff(f.read(64))
        raise DatasetError(f"{path}: unreadable Parquet ({e}){'' if 'Parquet' in hint else hint}") from None
    return ((f"row {i}", r) for i, r in enumerate(rows))


def _read_hf(cfg: DatasetConfig) -> Iterable[tuple[str, Any]]:
    import datasets

    if cfg.path in LOCAL_BUILDERS:
        for given in cfg.data_files:
            if "://" not in given and not any(c in given for c in "*?["):
                path, shown = _resolve(given)
                if not path.exists():
                    raise DatasetError(f"{shown}: no such file")
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


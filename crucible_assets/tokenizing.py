"""Dataset records to Parquet rows of token ids and loss weights. One loop for every
recipe (errors name the record; truncation is counted, never silent); the row builders
differ: a supervised example, or a preference pair whose completion is the last assistant
message of each side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import compress, islice
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible_assets.rendering import (Encoded, Layout, RenderError, encode, layout, prompt_and_reference,
                                       require_trainable, stop_sequences)
from resources.store.artifact_store import ArtifactRef
from resources.store.jsonl import read_jsonl

TOKENS, WEIGHTS = pa.list_(pa.int32()), pa.list_(pa.float32())
SCHEMAS = {
    "conversations": pa.schema([("tokens", TOKENS), ("weights", WEIGHTS), ("prompt_tokens", TOKENS),
                      ("reference", pa.string()), ("target_bytes", pa.int64())]),
    "pairs": pa.schema([("chosen_tokens", TOKENS), ("chosen_weights", WEIGHTS), ("rejected_tokens", TOKENS),
                        ("rejected_weights", WEIGHTS), ("prompt_tokens", TOKENS), ("reference", pa.string())]),
    "problems": pa.schema([("prompt_tokens", TOKENS), ("reference", pa.string())]),
}


Where = Callable[[], str]  # names the record in an error, built only when one is raised
CHUNK = 1024  # records per tokenizer call
OverlongPolicy = Literal["drop", "error"]
SOURCES = "sources.json"  # beside a dataset's splits: {split: [where each record came from, in order]}
# A dataset's splits: train, the held-out test, and test_ood (items outside the training
# distribution, reported apart) where the dataset config names an ood_generator.
SPLITS = ("train", "test", "test_ood")


def stored_splits(directory: Path, suffix: str = "jsonl") -> list[str]:
    """The splits a dataset (jsonl) or tokenized (parquet) artifact holds."""
    return [split for split in SPLITS if (directory / f"{split}.{suffix}").exists()]


class Overlong(RenderError):
    """A record longer than max_length with nothing left to learn once truncated (or a prompt
    that does not fit at all): dropped and counted, or an error, as the policy says."""


class Renderer:
    """The tokenizer plus the tokenize config: renders conversations to layouts, then turns
    their encodings into truncated rows, counting truncation."""

    def __init__(self, tok, max_length: int, train_on_what: str, renderer: str, overlong: OverlongPolicy = "error") -> None:
        self.tok, self.max_length, self.train_on_what, self.renderer = tok, max_length, train_on_what, renderer
        self.overlong = overlong
        self.truncated = self.dropped = 0

    def layout(self, messages: list[dict], where: Where, train_on_what: str | None = None,
               with_prompt: bool = False) -> Layout:
        try:
            return layout(self.tok, {"messages": messages}, train_on_what or self.train_on_what, self.renderer, with_prompt)
        except RenderError as e:
            raise RenderError(f"{where()}: {e}") from None

    def truncate(self, e: Encoded) -> tuple[list[int], list[float]]:
        self.truncated += len(e.ids) > self.max_length
        return e.ids[: self.max_length], e.weights[: self.max_length]

    def trainable(self, e: Encoded, where: Where, train_on_what: str | None = None) -> tuple[list[int], list[float]]:
        try:
            require_trainable(e.weights, train_on_what or self.train_on_what)
        except RenderError as err:
            raise RenderError(f"{where()}: {err}") from None
        tokens, weights = self.truncate(e)
        if sum(weights[1:]) == 0:
            raise Overlong(f"{where()}: loss weights sum to zero within max_length {self.max_length}")
        return tokens, weights


@dataclass(frozen=True)
class RowBuilder:
    """A row in two steps, so that a chunk of records shares one tokenizer call: the
    layouts a record needs, then the row from their encodings."""
    layouts: Callable[[Renderer, dict, Where], list[Layout]]
    row: Callable[[Renderer, dict, list[Encoded], Where], tuple[dict, list[int]]]


def _messages(where: Where, field: str) -> Where:
    return lambda: f"{where()}: field '{field}'"


def _sft_layouts(r: Renderer, record: dict, where: Where) -> list[Layout]:
    if "text" in record:
        return [layout(r.tok, record, r.train_on_what, r.renderer, with_prompt=False)]
    return [r.layout(record["messages"], _messages(where, "messages"), with_prompt=True)]


def _sft_row(r: Renderer, record: dict, encoded: list[Encoded], where: Where) -> tuple[dict, list[int]]:
    (e,) = encoded
    tokens, weights = r.truncate(e) if "text" in record else r.trainable(e, _messages(where, "messages"))
    target_text = r.tok.decode(list(compress(islice(tokens, 1, None), islice(weights, 1, None))))  # weights are 0 or 1
    row = {"tokens": tokens, "weights": weights, "prompt_tokens": e.prompt_ids, "reference": e.reference,
           "target_bytes": len(target_text.encode())}
    return row, [len(tokens)]


def _pair_layouts(r: Renderer, record: dict, where: Where) -> list[Layout]:
    return [r.layout(record[side], _messages(where, side), "last_assistant_message", with_prompt=side == "chosen")
            for side in ("chosen", "rejected")]


def _pair_row(r: Renderer, record: dict, encoded: list[Encoded], where: Where) -> tuple[dict, list[int]]:
    row = {}
    for side, e in zip(("chosen", "rejected"), encoded):
        row[f"{side}_tokens"], row[f"{side}_weights"] = r.trainable(e, _messages(where, side), "last_assistant_message")
    row["prompt_tokens"], row["reference"] = encoded[0].prompt_ids, encoded[0].reference
    return row, [len(row["chosen_tokens"]), len(row["rejected_tokens"])]


def _problem_row(r: Renderer, record: dict, encoded: list[Encoded], where: Where) -> tuple[dict, list[int]]:
    """The question as a user turn, rendered up to the assistant's generation prompt (one
    short text per record: not worth batching)."""
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    prompt, reference = prompt_and_reference(r.tok, {"messages": messages}, r.renderer)
    if len(prompt) > r.max_length:
        raise Overlong(f"{where()}: field 'question': the prompt has {len(prompt)} tokens, more than max_length {r.max_length}")
    return {"prompt_tokens": prompt, "reference": reference}, [len(prompt)]


ROW_BUILDERS = {"conversations": RowBuilder(_sft_layouts, _sft_row), "pairs": RowBuilder(_pair_layouts, _pair_row),
                "problems": RowBuilder(lambda r, record, where: [], _problem_row)}


def build_rows(r: Renderer, kind: str, records: list[tuple[dict, Where]]) -> list[tuple[dict, list[int]]]:
    """One row per record, less the overlong ones the "drop" policy leaves out (counted in
    `r.dropped`, and not as truncated)."""
    builder = ROW_BUILDERS[kind]
    layouts = [builder.layouts(r, record, where) for record, where in records]
    encoded = iter(encode(r.tok, [lay for lays in layouts for lay in lays]))
    rows = []
    for (record, where), lays in zip(records, layouts):
        encodings, truncated = [next(encoded) for _ in lays], r.truncated
        try:
            rows.append(builder.row(r, record, encodings, where))
        except Overlong:
            if r.overlong == "error":
                raise
            r.dropped, r.truncated = r.dropped + 1, truncated
    return rows


def sft_row(r: Renderer, record: dict, where: Where) -> tuple[dict, list[int]]:
    return build_rows(r, "conversations", [(record, where)])[0]


def pair_row(r: Renderer, record: dict, where: Where) -> tuple[dict, list[int]]:
    return build_rows(r, "pairs", [(record, where)])[0]


def problem_row(r: Renderer, record: dict, where: Where) -> tuple[dict, list[int]]:
    return build_rows(r, "problems", [(record, where)])[0]


def record_origins(dataset_dir: Path, split: str) -> Callable[[int], str]:
    """Record i (from 1) of a stored split -> where the user's data had it ("/their/file.jsonl:
    line 12"); the stored file itself for a dataset without a sources list."""
    path = dataset_dir / SOURCES
    if not path.exists():
        return lambda i: f"{dataset_dir / f'{split}.jsonl'}: record {i}"
    origins = json.loads(path.read_text())[split]
    return lambda i: origins[i - 1]


def tokenize_splits(dataset_dir: Path, out: Path, tok, kind: str, max_length: int, train_on_what: str, renderer: str,
                    overlong: OverlongPolicy = "drop") -> dict:
    summary = {}
    for split in stored_splits(dataset_dir):
        path = dataset_dir / f"{split}.jsonl"
        r = Renderer(tok, max_length, train_on_what, renderer, overlong)
        rows, lengths = [], []
        records, origins = read_jsonl(path), record_origins(dataset_dir, split)
        for first in range(0, len(records), CHUNK):
            chunk = [(record, lambda i=i, record=record: f"{origins(i)} ({json.dumps(record)[:300]})")
                     for i, record in enumerate(records[first: first + CHUNK], first + 1)]
            for row, row_lengths in build_rows(r, kind, chunk):
                rows.append(row)
                lengths += row_lengths
        if not rows:
            raise RenderError(f"every one of the {len(records)} {split} records is longer than max_length {max_length} "
                              "with nothing left to learn; raise max_length")
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]), out / f"{split}.parquet")
        summary[f"{split}_rows"] = len(rows)
        summary[f"{split}_tokens"] = int(sum(lengths))
        summary[f"{split}_loss_tokens"] = int(sum(sum(v[1:]) for row in rows for k, v in row.items() if k.endswith("weights")))
        summary[f"{split}_truncated"] = r.truncated
        summary[f"{split}_dropped_overlong"] = r.dropped
        summary[f"{split}_length_percentiles"] = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)}
    render_info = {"renderer": renderer, "train_on_what": train_on_what, "stop": stop_sequences(tok, renderer)}
    (out / "render.json").write_text(json.dumps(render_info, sort_keys=True))
    return summary | {"stop": render_info["stop"]}


def read_rows(tokenized: ArtifactRef, split: str) -> list[dict]:
    """Every row of a tokenized artifact's split, all columns."""
    return pq.read_table(tokenized.dir / f"{split}.parquet").to_pylist()


def read_ood_rows(tokenized: ArtifactRef) -> list[dict]:
    """The test_ood split's rows; none where the dataset has no such split."""
    return read_rows(tokenized, "test_ood") if "test_ood" in stored_splits(tokenized.dir, "parquet") else []


def read_stop(tokenized: ArtifactRef) -> list[str]:
    """The stop sequences of the renderer the shard was made with: where sampling ends a turn."""
    return json.loads((tokenized.dir / "render.json").read_text())["stop"]

"""Dataset records to Parquet rows of token ids and loss weights. One loop for every
recipe (errors name the record; truncation is counted, never silent); the row builders
differ: a supervised example, or a preference pair whose completion is the last assistant
message of each side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible_assets.rendering import RenderError, prompt_and_reference, render, render_with_prompt, stop_sequences

TOKENS, WEIGHTS = pa.list_(pa.int32()), pa.list_(pa.float32())
SCHEMAS = {
    "sft": pa.schema([("tokens", TOKENS), ("weights", WEIGHTS), ("prompt_tokens", TOKENS),
                      ("reference", pa.string()), ("target_bytes", pa.int64())]),
    "pairs": pa.schema([("chosen_tokens", TOKENS), ("chosen_weights", WEIGHTS), ("rejected_tokens", TOKENS),
                        ("rejected_weights", WEIGHTS), ("prompt_tokens", TOKENS), ("reference", pa.string())]),
    "problems": pa.schema([("prompt_tokens", TOKENS), ("reference", pa.string())]),
}


class Renderer:
    """The tokenizer plus the tokenize config, rendering one conversation at a time."""

    def __init__(self, tok, max_length: int, train_on_what: str, renderer: str) -> None:
        self.tok, self.max_length, self.train_on_what, self.renderer = tok, max_length, train_on_what, renderer
        self.truncated = 0

    def __call__(self, messages: list[dict], where: Callable[[], str], train_on_what: str | None = None,
                 with_prompt: bool = False) -> tuple[list[int], list[float], tuple[list[int], str]]:
        """Truncated ids and weights, and (with_prompt) the untruncated eval prompt and reference."""
        try:
            tokens, weights, prompt = render_with_prompt(self.tok, {"messages": messages}, train_on_what or self.train_on_what,
                                                         self.renderer, with_prompt)
        except RenderError as e:
            raise RenderError(f"{where()}: {e}") from None
        self.truncated += len(tokens) > self.max_length
        tokens, weights = tokens[: self.max_length], weights[: self.max_length]
        if sum(weights[1:]) == 0:
            raise RenderError(f"{where()}: loss weights sum to zero within max_length {self.max_length}")
        return tokens, weights, prompt


def sft_row(r: Renderer, record: dict, where) -> tuple[dict, list[int]]:
    if "text" in record:
        tokens, weights = render(r.tok, record)
        r.truncated += len(tokens) > r.max_length
        tokens, weights = tokens[: r.max_length], weights[: r.max_length]
        prompt, reference = [], ""
    else:
        tokens, weights, (prompt, reference) = r(record["messages"], lambda: f"{where()}: field 'messages'", with_prompt=True)
    target_text = r.tok.decode([t for t, w in zip(tokens[1:], weights[1:]) if w > 0])
    row = {"tokens": tokens, "weights": weights, "prompt_tokens": prompt, "reference": reference,
           "target_bytes": len(target_text.encode())}
    return row, [len(tokens)]


def pair_row(r: Renderer, record: dict, where) -> tuple[dict, list[int]]:
    row, prompt = {}, {}
    for side in ("chosen", "rejected"):
        row[f"{side}_tokens"], row[f"{side}_weights"], prompt[side] = r(
            record[side], lambda: f"{where()}: field '{side}'", "last_assistant_message", with_prompt=side == "chosen")
    row["prompt_tokens"], row["reference"] = prompt["chosen"]
    return row, [len(row["chosen_tokens"]), len(row["rejected_tokens"])]


def problem_row(r: Renderer, record: dict, where) -> tuple[dict, list[int]]:
    """The question as a user turn, rendered up to the assistant's generation prompt."""
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    prompt, reference = prompt_and_reference(r.tok, {"messages": messages}, r.renderer)
    if len(prompt) > r.max_length:
        raise RenderError(f"{where()}: field 'question': the prompt has {len(prompt)} tokens, more than max_length {r.max_length}")
    return {"prompt_tokens": prompt, "reference": reference}, [len(prompt)]


ROW_BUILDERS = {"sft": sft_row, "pairs": pair_row, "problems": problem_row}


def tokenize_splits(dataset_dir: Path, out: Path, tok, kind: str, max_length: int, train_on_what: str, renderer: str) -> dict:
    summary = {}
    for split in ("train", "test"):
        path = dataset_dir / f"{split}.jsonl"
        r = Renderer(tok, max_length, train_on_what, renderer)
        rows, lengths = [], []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            record = json.loads(line)
            row, row_lengths = ROW_BUILDERS[kind](r, record, lambda: f"{path}: record {i} ({line[:300]})")
            rows.append(row)
            lengths += row_lengths
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]), out / f"{split}.parquet")
        summary[f"{split}_rows"] = len(rows)
        summary[f"{split}_tokens"] = int(sum(lengths))
        summary[f"{split}_loss_tokens"] = int(sum(sum(v[1:]) for row in rows for k, v in row.items() if k.endswith("weights")))
        summary[f"{split}_truncated"] = r.truncated
        summary[f"{split}_length_percentiles"] = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)}
    render_info = {"renderer": renderer, "train_on_what": train_on_what, "stop": stop_sequences(tok, renderer)}
    (out / "render.json").write_text(json.dumps(render_info, sort_keys=True))
    return summary | {"stop": render_info["stop"]}

"""Tokenization: our tokenized-shard code (JSONL in, chat template, loss weights from the
assistant spans, Parquet out) against `datasets.map(batched=True)` applying the same fast
tokenizer's chat template to in-memory rows (ids only: no weights, no files). Rate: rows/s."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.result import Row
from bench.timing import interleaved, medians, timed
from bench.workload import MAX_LENGTH, mixed_chats
from crucible_assets.tokenizing import tokenize_splits


def run(w, plan) -> list[Row]:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    chats = mixed_chats(plan.tokenize_rows, seed=1)
    dataset_dir = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[1:]))
    (dataset_dir / "test.jsonl").write_text(json.dumps(chats[0]) + "\n")
    tok = w.tokenizer

    def ours() -> float:
        out = Path(tempfile.mkdtemp(prefix="bench_tok_out_"))
        return len(chats) / timed(lambda: tokenize_splits(dataset_dir, out, tok, "conversations", MAX_LENGTH,
                                                          "all_assistant_messages", "chat_template"))

    def datasets_map() -> float:
        ds = Dataset.from_list(chats)

        def encode(batch):
            return {"input_ids": tok.apply_chat_template(batch["messages"], tokenize=True, truncation=True,
                                                         max_length=MAX_LENGTH, return_dict=False)}

        return len(chats) / timed(lambda: ds.map(encode, batched=True, remove_columns=["messages"]))

    m = medians(interleaved({"ours": ours, "datasets": datasets_map}, plan.reps))
    details = {"ours rows/s": m["ours"], "datasets.map rows/s": m["datasets"], "rows": len(chats)}
    return [Row("Tokenization", "rows/s, ours / datasets.map(batched=True)", m["ours"] / m["datasets"], 1.0, details=details,
                limit="exact loss weights cost two chat-template renders per assistant turn (the prefixes up to its start "
                "and end), where the reference renders each conversation once; the eval prompt and the weights, the "
                "target byte counts and the Parquet files are work the reference does not do")]

"""Tokenization: our tokenized-shard code against `datasets` producing the same artifact, as an
expert writes it: the same JSONL files read by `load_dataset("json")`, a batched `map` of
`apply_chat_template` with the tokenizer's own template, its assistant turns wrapped in
`{% generation %}`, returning ids and assistant masks (truncated to the same max_length), and
each split written with `to_parquet`. Both sides are timed end to end, files in, files out,
on the same seeded chats, each from a collected heap (timeit disables the collector for the
same reason): a full collection costs in proportion to the bench process's heap (the model,
torch), not to either side's work, and lands on whichever side crosses its threshold. Rate:
rows/s."""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

from bench.result import Row
from bench.timing import interleaved, medians, timed
from bench.workload import MAX_LENGTH, mixed_chats
from crucible_assets.tokenizing import stored_splits, tokenize_splits

# A turn of the built-in ChatML template (crucible_assets/base.py), and the same turn with the
# assistant's content and end-of-turn marker inside {% generation %}: what our loss weights cover.
TURN = "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
GENERATION_TURN = ("{{ '<|im_start|>' + message['role'] + '\\n' }}"
                   "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                   "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}")
BATCH_SIZE = 1000  # datasets.map's default


def generation_template(template: str) -> str:
    """The tokenizer's own template with assistant turns marked for return_assistant_tokens_mask."""
    if TURN not in template:
        raise ValueError("the tokenizer's chat template is not the built-in ChatML one this row knows how to mark")
    return template.replace(TURN, GENERATION_TURN)


def datasets_reference(tok, dataset_dir: Path, out: Path, max_length: int = MAX_LENGTH) -> None:
    """The reference's artifact: {split}.parquet of input_ids and assistant_masks per record."""
    from datasets import load_dataset

    template = generation_template(tok.chat_template)

    def encode(batch: dict) -> dict:
        enc = tok.apply_chat_template(batch["messages"], chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, truncation=True, max_length=max_length,
                                      tokenizer_kwargs={"return_attention_mask": False})
        return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_masks"]}

    files = {split: str(dataset_dir / f"{split}.jsonl") for split in stored_splits(dataset_dir)}
    # a fresh cache each time: the JSON is parsed and the map computed anew, as ours does
    splits = load_dataset("json", data_files=files, cache_dir=str(out / "cache"))
    splits = splits.map(encode, batched=True, batch_size=BATCH_SIZE, remove_columns=["messages"])
    for split, ds in splits.items():
        ds.to_parquet(str(out / f"{split}.parquet"))


def run(w, plan) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    chats = mixed_chats(plan.tokenize_rows, seed=1)
    dataset_dir = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[1:]))
    (dataset_dir / "test.jsonl").write_text(json.dumps(chats[0]) + "\n")
    tok = w.tokenizer

    def ours() -> float:
        out = Path(tempfile.mkdtemp(prefix="bench_tok_out_"))
        gc.collect()
        return len(chats) / timed(lambda: tokenize_splits(dataset_dir, out, tok, "conversations", MAX_LENGTH,
                                                          "all_assistant_messages", "chat_template"))

    def reference() -> float:
        out = Path(tempfile.mkdtemp(prefix="bench_tok_datasets_"))
        gc.collect()
        return len(chats) / timed(lambda: datasets_reference(tok, dataset_dir, out))

    m = medians(interleaved({"ours": ours, "datasets": reference}, plan.reps))
    details = {"ours rows/s": m["ours"], "datasets.map rows/s": m["datasets"], "rows": len(chats),
               "reference": f"datasets {datasets.__version__}: load_dataset('json') of the same JSONL files (a fresh "
                            f"cache_dir each repetition), map(batched=True, batch_size={BATCH_SIZE}, num_proc=None: two "
                            "processes were slower on 2000 rows) of apply_chat_template(tokenize=True, return_dict=True, "
                            f"return_assistant_tokens_mask=True, truncation=True, max_length={MAX_LENGTH}, no attention "
                            "mask) with the tokenizer's template, assistant content and end-of-turn marker in "
                            "{% generation %}, to_parquet per split",
               "ours": f"tokenize_splits, chat_template renderer, all_assistant_messages, max_length={MAX_LENGTH}: "
                       "ids, loss weights, eval prompt, reference and target bytes per row"}
    return [Row("Tokenization", "rows/s, ours / datasets (ids + assistant masks to Parquet)", m["ours"] / m["datasets"],
                1.0, details=details,
                limit="both sides spend about half their time in the same fast tokenizer's encode_batch, so a busy "
                "machine narrows the gap; ours also builds every row's eval prompt, reference and target byte count "
                "(a decode per row), which the reference does not")]

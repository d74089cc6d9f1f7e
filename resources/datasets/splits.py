"""Train/test splits by item identity, so a held-out item is one the model never trained on.

A record's identity is what the model is asked: a problem's question, a pair's shared
prompt, a conversation's prompt (every message before its last assistant message), or a
document's text, normalised (case-folded, whitespace collapsed). Synthetic generators sample
with replacement from small item spaces and user files repeat prompts, so splitting records
would put the same question on both sides; splitting identities cannot.

Whether an item is held out depends on nothing but the item, the seed and test_fraction: a
seeded hash of its identity, compared with test_fraction. So two recipes of a chain that
split with the same seed agree on every item they share (a problem asked in math_rl is held
out there exactly when the same question, asked as a chat, was held out of sl_basic's
training), a smaller fraction holds out a subset of a larger one, and appending records
never moves an item from one side to the other. The held-out share is test_fraction up to
sampling noise, not exactly.

A held-out item counts once: the eval's bootstrap CIs resample examples as independent
draws, and an item repeated k times in the test split would weigh k times and narrow its CI
without new evidence. So the test split keeps the first record of each held-out identity;
the later ones are dropped (neither trained on nor evaluated) and counted by the caller as
`len(records) - len(train) - len(test)`."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Callable, TypeVar

from resources.datasets.sources import DatasetError

T = TypeVar("T")


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def _prompt(messages: list[dict]) -> str:
    """Every message before the last assistant message, roles kept; a conversation with
    nothing before it (one assistant message) is its own prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return json.dumps([[m["role"], normalise(m["content"])] for m in (messages[:last] or messages)])


def record_identity(record: dict) -> str:
    """The held-out item a normalised record stands for (see the module docstring)."""
    if "question" in record:  # asked as a one-turn chat: the same item as that chat's prompt
        return _prompt([{"role": "user", "content": record["question"]}])
    if "chosen" in record:
        return _prompt(record["chosen"])
    if "messages" in record:
        return _prompt(record["messages"])
    return normalise(record["text"])


def held_out_score(identity: str, seed: int) -> float:
    """A uniform draw in [0, 1) fixed by the item and the seed: the item is held out below test_fraction."""
    digest = hashlib.sha256(f"{seed}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: list[T], test_fraction: float, seed: int,
                  identity: Callable[[T], str] = record_identity) -> tuple[list[T], list[T]]:
    """(train, test): the distinct identities whose held_out_score is below `test_fraction` (at
    least one) are held out; train keeps every record of the others (repeats included, in
    order), test the first record of each held-out identity (in order)."""
    if not 0 < test_fraction < 1 or math.isnan(test_fraction):
        raise DatasetError(f"dataset config: field 'test_fraction': {test_fraction} is not in (0, 1)")
    ids = [identity(r) for r in records]
    scores = {i: held_out_score(i, seed) for i in dict.fromkeys(ids)}
    held_out = {i for i, score in scores.items() if score < test_fraction} or {min(scores, key=scores.get)}
    if len(held_out) == len(scores):
        raise DatasetError(f"dataset config: {len(records)} records hold {len(scores)} distinct items (by normalised "
                           "prompt or question), which leaves nothing to train on after the test split")
    train = [r for r, i in zip(records, ids) if i not in held_out]
    return train, once_each([r for r, i in zip(records, ids) if i in held_out], identity)


def once_each(records: list[T], identity: Callable[[T], str] = record_identity) -> list[T]:
    """The first record of each identity, in order: a held-out set counts each item once."""
    first: dict[str, T] = {}
    for r in records:
        first.setdefault(identity(r), r)
    return list(first.values())

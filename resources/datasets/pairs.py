"""Preference pairs in the formats people publish them, normalized to one shape:
`{"chosen": [messages], "rejected": [messages]}`, two full conversations that should share
everything but the last assistant turn (the blocking checks verify that they do).

- UltraFeedback binarized / TRL conversational: `chosen` and `rejected` message lists.
- HH-RLHF: `chosen` and `rejected` transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...").
- HelpSteer3 preference: `context` messages, `response1`, `response2`, and
  `overall_preference` (< 0: response1 is better, > 0: response2; ties are dropped).
"""

from __future__ import annotations

import re
from typing import Any

from resources.datasets.sources import DatasetError, validate_record

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> list[dict]:
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise ValueError("transcript must start with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def validate_pair(record: Any, origin: str, where: str) -> dict | None:
    """Normalized pair, or None for a HelpSteer3 tie; errors name file, record and field."""

    def fail(field: str, problem: str) -> DatasetError:
        return DatasetError(f"{origin}: {where}: field {field!r}: {problem}")

    if not isinstance(record, dict):
        raise DatasetError(f"{origin}: {where}: expected a JSON object, got {type(record).__name__}")
    if "response1" in record:  # HelpSteer3
        for field in ("context", "response1", "response2", "overall_preference"):
            if field not in record:
                raise fail(field, "missing")
        pref = record["overall_preference"]
        if not isinstance(pref, int) or isinstance(pref, bool):
            raise fail("overall_preference", f"expected an integer, got {type(pref).__name__}")
        if pref == 0:
            return None
        better, worse = ("response1", "response2") if pref < 0 else ("response2", "response1")
        context = record["context"]
        record = {"chosen": _with_reply(context, record[better], fail, better),
                  "rejected": _with_reply(context, record[worse], fail, worse)}
    for field in ("chosen", "rejected"):
        if field not in record:
            raise fail(field, "missing")
        if isinstance(record[field], str):  # HH-RLHF transcript
            try:
                record = {**record, field: parse_hh_transcript(record[field])}
            except ValueError as e:
                raise fail(field, str(e)) from None
    pair = {}
    for field in ("chosen", "rejected"):
        try:
            pair[field] = validate_record({"messages": record[field]}, origin, where)["messages"]
        except DatasetError as e:
            raise DatasetError(str(e).replace("field 'messages", f"field '{field}")) from None
        if pair[field][-1]["role"] != "assistant":
            raise fail(field, "the last message must be the assistant's reply")
    # caught here rather than only by the blocking checks, which run after the dataset is stored
    if pair["chosen"][:-1] != pair["rejected"][:-1]:
        raise fail("rejected", "its prompt (every message before the last) differs from chosen's; "
                               "a pair must share the prompt and differ only in the reply")
    if pair["chosen"][-1]["content"].strip() == pair["rejected"][-1]["content"].strip():
        raise fail("rejected", "the reply is identical to the chosen one; a pair must prefer one reply over another")
    return pair


def _with_reply(context: Any, reply: Any, fail, field: str) -> list:
    if not isinstance(context, list):
        raise fail("context", f"expected a list of messages, got {type(context).__name__}")
    if not isinstance(reply, str):
        raise fail(field, f"expected a string, got {type(reply).__name__}")
    return [*context, {"role": "assistant", "content": reply}]


validate_pair.drops = "HelpSteer3 ties: overall_preference 0"  # why load_records' note says records went

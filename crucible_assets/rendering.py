"""Records to token ids and loss weights, through the model's own chat template.

The whole conversation is tokenized once (so ids equal `apply_chat_template` output token
for token) and weights come from character spans: an assistant message's span runs from
the end of the generation prompt to its end-of-turn token, trailing whitespace excluded.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

TRAIN_ON = ("last_assistant_message", "all_assistant_messages", "all_messages")


class RenderError(ValueError):
    pass


def _template(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def weighted_spans(tok: PreTrainedTokenizerBase, messages: list[dict], train_on_what: str) -> tuple[str, list[tuple[int, int]]]:
    text = _template(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if train_on_what != "all_messages" and m["role"] != "assistant":
            continue
        if train_on_what == "all_messages":
            start = len(_template(tok, messages[:i], False)) if i else 0
        else:
            start = len(_template(tok, messages[:i], True))
        end = len(_template(tok, messages[: i + 1], False).rstrip())
        spans.append((start, end))
    if train_on_what == "last_assistant_message":
        spans = spans[-1:]
    return text, spans


def render(tok: PreTrainedTokenizerBase, record: dict, train_on_what: str = "all_assistant_messages") -> tuple[list[int], list[float]]:
    if train_on_what not in TRAIN_ON:
        raise RenderError(f"train_on_what {train_on_what!r} is not one of {TRAIN_ON}")
    if "text" in record:
        ids = tok(record["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return ids, [1.0] * len(ids)
    if not tok.chat_template:
        raise RenderError("this tokenizer has no chat template; give text records or a model with a template")
    text, spans = weighted_spans(tok, record["messages"], train_on_what)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    weights = [1.0 if any(s <= a < e for s, e in spans) else 0.0 for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], weights


def prompt_and_reference(tok: PreTrainedTokenizerBase, record: dict) -> tuple[list[int], str]:
    """The generation prompt before the last assistant message, and that message (for eval)."""
    messages = record.get("messages")
    if not messages or messages[-1]["role"] != "assistant" or not tok.chat_template:
        return [], ""
    prompt = _template(tok, messages[:-1], True)
    return tok(prompt, add_special_tokens=False)["input_ids"], messages[-1]["content"]

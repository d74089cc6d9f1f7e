"""Records to token ids and loss weights.

`chat_template` renders with the model's own template: the whole conversation is tokenized
once (so ids equal `apply_chat_template` output token for token, BOS/EOS included exactly
as the template writes them) and weights come from character spans. An assistant message's
span runs from the end of the generation prompt before it to its end-of-turn marker, so
the weights cover exactly the assistant content plus the token that ends the turn.

`role_colon` serves models without a template: "User: ...\\n\\nAssistant: ...", where an
assistant turn ends with "\\n\\nUser:", the stop sequence at sampling time.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

TRAIN_ON = ("last_assistant_message", "all_assistant_messages", "all_messages")
RENDERERS = ("chat_template", "role_colon")
ROLE_COLON_STOP = "\n\nUser:"


class RenderError(ValueError):
    pass


def _template(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _prefix_len(text: str, prefix: str, i: int) -> int:
    if not text.startswith(prefix):
        raise RenderError(f"the chat template renders messages[:{i}] differently inside the full conversation, "
                          "so loss weights cannot be placed by prefix; use renderer role_colon or a prefix-stable template")
    return len(prefix)


def _template_spans(tok: PreTrainedTokenizerBase, messages: list[dict], train_on_what: str) -> tuple[str, list[tuple[int, int]]]:
    text = _template(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if train_on_what != "all_messages" and m["role"] != "assistant":
            continue
        if train_on_what == "all_messages":
            start = _prefix_len(text, _template(tok, messages[:i], False), i) if i else 0
        else:
            start = _prefix_len(text, _template(tok, messages[:i], True), i)
        # rstrip: the newline a template writes after the end-of-turn token is not the turn
        end = len(_template(tok, messages[: i + 1], False).rstrip())
        spans.append((start, end))
    return text, spans


def _role_colon_text(messages: list[dict]) -> tuple[str, list[tuple[int, int, str]]]:
    """Text and (start, end, role) of each message body, the role label excluded."""
    text, bodies = "", []
    for m in messages:
        if text:
            text += "\n\n"
        text += f"{m['role'].capitalize()}:"
        bodies.append((len(text), len(text) + 1 + len(m["content"]), m["role"]))
        text += " " + m["content"]
    return text, bodies


def _role_colon_spans(messages: list[dict], train_on_what: str) -> tuple[str, list[tuple[int, int]]]:
    text, bodies = _role_colon_text(messages)
    if messages[-1]["role"] == "assistant":
        text += ROLE_COLON_STOP  # the last turn ends the way generation is stopped
    spans = []
    for start, end, role in bodies:
        if train_on_what == "all_messages" or role == "assistant":
            follows_user = text.startswith(ROLE_COLON_STOP, end)
            spans.append((start, end + len(ROLE_COLON_STOP) if follows_user else end))
    return text, spans


def render(tok: PreTrainedTokenizerBase, record: dict, train_on_what: str = "all_assistant_messages",
           renderer: str = "chat_template") -> tuple[list[int], list[float]]:
    """Token ids and per-token loss weights; raises RenderError when nothing would be trained."""
    if train_on_what not in TRAIN_ON:
        raise RenderError(f"train_on_what {train_on_what!r} is not one of {TRAIN_ON}")
    if renderer not in RENDERERS:
        raise RenderError(f"renderer {renderer!r} is not one of {RENDERERS}")
    if "text" in record:
        ids = tok(record["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return ids, [1.0] * len(ids)
    messages = record["messages"]
    if renderer == "chat_template":
        if not tok.chat_template:
            raise RenderError("this tokenizer has no chat template; use renderer role_colon")
        text, spans = _template_spans(tok, messages, train_on_what)
        add_special = False  # the template writes BOS itself; adding it again doubles it
    else:
        text, spans = _role_colon_spans(messages, train_on_what)
        add_special = True  # plain text: the tokenizer's own BOS convention applies
    if train_on_what == "last_assistant_message":
        spans = spans[-1:] if messages[-1]["role"] == "assistant" else []
    enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
    weights = [1.0 if a < b and any(s <= a < e for s, e in spans) else 0.0 for a, b in enc["offset_mapping"]]
    if sum(weights[1:]) == 0:
        raise RenderError(f"loss weights sum to zero with train_on_what={train_on_what!r}: nothing to train on")
    return enc["input_ids"], weights


def prompt_and_reference(tok: PreTrainedTokenizerBase, record: dict, renderer: str = "chat_template") -> tuple[list[int], str]:
    """The generation prompt before the last assistant message, and that message (for eval)."""
    messages = record.get("messages")
    if not messages or messages[-1]["role"] != "assistant":
        return [], ""
    if renderer == "chat_template":
        if not tok.chat_template:
            return [], ""
        prompt = tok(_template(tok, messages[:-1], True), add_special_tokens=False)["input_ids"]
    else:
        text, _ = _role_colon_text(messages[:-1])
        prompt = tok(text + "\n\nAssistant:")["input_ids"]
    return prompt, messages[-1]["content"]


def stop_sequences(tok: PreTrainedTokenizerBase, renderer: str) -> list[str]:
    """What ends an assistant turn: the template's end-of-turn marker, found by rendering a
    probe conversation, or role_colon's "\\n\\nUser:"."""
    if renderer == "role_colon":
        return [ROLE_COLON_STOP]
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\u2603"}]
    text, spans = _template_spans(tok, probe, "last_assistant_message")
    start, end = spans[-1]
    marker = text[start:end].split("\u2603", 1)[1]
    return [marker] if marker else []

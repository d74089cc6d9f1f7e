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

import functools
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
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


def _prefix_renders(tok: PreTrainedTokenizerBase, messages: list[dict]) -> Callable[[int, bool], str]:
    """render(n, add_generation_prompt) of messages[:n], each rendered once: the spans end where
    the full text ends and the eval prompt is the last assistant span's start, and
    apply_chat_template is most of the cost of tokenizing."""
    return functools.cache(lambda n, add_generation_prompt: _template(tok, messages[:n], add_generation_prompt))


def _template_spans(tok: PreTrainedTokenizerBase, messages: list[dict], train_on_what: str,
                    prefix: Callable[[int, bool], str]) -> tuple[str, list[tuple[int, int]]]:
    text = prefix(len(messages), False)
    spans = []
    for i, m in enumerate(messages):
        if train_on_what != "all_messages" and m["role"] != "assistant":
            continue
        if train_on_what == "all_messages":
            start = _prefix_len(text, prefix(i, False), i) if i else 0
        else:
            start = _prefix_len(text, prefix(i, True), i)
        # rstrip: the newline a template writes after the end-of-turn token is not the turn
        end = len(prefix(i + 1, False).rstrip())
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
    ids, weights, _ = render_with_prompt(tok, record, train_on_what, renderer, with_prompt=False)
    return ids, weights


def render_with_prompt(tok: PreTrainedTokenizerBase, record: dict, train_on_what: str, renderer: str,
                       with_prompt: bool = True) -> tuple[list[int], list[float], tuple[list[int], str]]:
    """`render` plus `prompt_and_reference` (([], "") unless with_prompt). They share the
    prefix renders and one tokenizer call: both texts take the same add_special_tokens, and a
    fast tokenizer encodes a batch exactly as it encodes each text alone."""
    if train_on_what not in TRAIN_ON:
        raise RenderError(f"train_on_what {train_on_what!r} is not one of {TRAIN_ON}")
    if renderer not in RENDERERS:
        raise RenderError(f"renderer {renderer!r} is not one of {RENDERERS}")
    if "text" in record:
        ids = tok(record["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return ids, [1.0] * len(ids), ([], "")
    messages = record["messages"]
    if renderer == "chat_template":
        if not tok.chat_template:
            raise RenderError("this tokenizer has no chat template; use renderer role_colon")
        prefix = _prefix_renders(tok, messages)
        text, spans = _template_spans(tok, messages, train_on_what, prefix)
        add_special = False  # the template writes BOS itself; adding it again doubles it
    else:
        prefix = None
        text, spans = _role_colon_spans(messages, train_on_what)
        add_special = True  # plain text: the tokenizer's own BOS convention applies
    if train_on_what == "last_assistant_message":
        spans = spans[-1:] if messages[-1]["role"] == "assistant" else []
    prompt = _prompt_text(tok, messages, renderer, prefix) if with_prompt else None
    texts = [text] if prompt is None else [text, prompt]
    enc = tok(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    weights = [1.0 if a < b and any(s <= a < e for s, e in spans) else 0.0 for a, b in enc["offset_mapping"][0]]
    if sum(weights[1:]) == 0:
        raise RenderError(f"loss weights sum to zero with train_on_what={train_on_what!r}: nothing to train on")
    return enc["input_ids"][0], weights, ([], "") if prompt is None else (enc["input_ids"][1], messages[-1]["content"])


def _prompt_text(tok: PreTrainedTokenizerBase, messages: list[dict], renderer: str,
                 prefix: Callable[[int, bool], str] | None) -> str | None:
    """The text before the last assistant message up to its generation prompt; None when there
    is no such message (or no template to render it with)."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    if renderer == "chat_template":
        return (prefix or _prefix_renders(tok, messages))(len(messages) - 1, True) if tok.chat_template else None
    text, _ = _role_colon_text(messages[:-1])
    return text + "\n\nAssistant:"


def prompt_and_reference(tok: PreTrainedTokenizerBase, record: dict, renderer: str = "chat_template") -> tuple[list[int], str]:
    """The generation prompt before the last assistant message, and that message (for eval)."""
    messages = record.get("messages")
    prompt = _prompt_text(tok, messages, renderer, None)
    if prompt is None:
        return [], ""
    return tok(prompt, add_special_tokens=renderer != "chat_template")["input_ids"], messages[-1]["content"]


def stop_sequences(tok: PreTrainedTokenizerBase, renderer: str) -> list[str]:
    """What ends an assistant turn: the template's end-of-turn marker, found by rendering a
    probe conversation, or role_colon's "\\n\\nUser:"."""
    if renderer == "role_colon":
        return [ROLE_COLON_STOP]
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\u2603"}]
    text, spans = _template_spans(tok, probe, "last_assistant_message", _prefix_renders(tok, probe))
    start, end = spans[-1]
    marker = text[start:end].split("\u2603", 1)[1]
    return [marker] if marker else []

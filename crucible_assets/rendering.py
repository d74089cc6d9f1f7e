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
import itertools
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, get_args

import numpy as np

from crucible_assets.chat_template import prefix_renders

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TrainOn = Literal["last_assistant_message", "all_assistant_messages", "all_messages"]
RendererName = Literal["chat_template", "role_colon"]  # the model's own template | "User: ...\n\nAssistant: ..."
TRAIN_ON, RENDERERS = get_args(TrainOn), get_args(RendererName)
ROLE_COLON_STOP = "\n\nUser:"


class RenderError(ValueError):
    pass


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # apply_chat_template rewrites these


def _prefix_len(text: str, prefix: str, i: int) -> int:
    if not text.startswith(prefix):
        raise RenderError(f"the chat template renders messages[:{i}] differently inside the full conversation, "
                          "so loss weights cannot be placed by prefix; use renderer role_colon or a prefix-stable template")
    return len(prefix)


def _prefix_renders(tok: PreTrainedTokenizerBase, messages: list[dict]) -> Callable[[int, bool], str]:
    """render(n, add_generation_prompt) of messages[:n], each rendered at most once: the spans
    end where the full text ends and the eval prompt is the last assistant span's start, and
    rendering is most of the cost of tokenizing. Messages of plain strings go to the compiled
    template (chat_template.py: apply_chat_template's normalizing and sandbox copies change
    nothing for them and cost more than the render); anything else takes the full path."""
    if all(type(v) is str and k not in REASONING_KEYS for m in messages for k, v in m.items()):
        return prefix_renders(tok, messages)
    return functools.cache(lambda n, add_generation_prompt: tok.apply_chat_template(
        messages[:n], tokenize=False, add_generation_prompt=add_generation_prompt))


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
    """`render` plus `prompt_and_reference` (([], "") unless with_prompt), sharing the prefix renders."""
    e = encode(tok, [layout(tok, record, train_on_what, renderer, with_prompt)])[0]
    if "text" not in record:
        require_trainable(e.weights, train_on_what)
    return e.ids, e.weights, (e.prompt_ids, e.reference)


def require_trainable(weights: list[float], train_on_what: str) -> None:
    """The first token is never a target, so its weight does not count."""
    if sum(weights[1:]) == 0:
        raise RenderError(f"loss weights sum to zero with train_on_what={train_on_what!r}: nothing to train on")


@dataclass
class Layout:
    """A record rendered to text but not yet tokenized, so that many records can share one
    tokenizer call."""
    text: str
    spans: list[tuple[int, int]]  # character ranges whose tokens carry loss weight
    add_special: bool
    prompt: str | None = None  # the eval prompt before the last assistant message
    reference: str = ""        # that message
    plain_text: bool = False   # a {"text": ...} record: EOS appended, every token weighted


@dataclass
class Encoded:
    ids: list[int]
    weights: list[float]
    prompt_ids: list[int]
    reference: str


def layout(tok: PreTrainedTokenizerBase, record: dict, train_on_what: str, renderer: str, with_prompt: bool) -> Layout:
    if train_on_what not in TRAIN_ON:
        raise RenderError(f"train_on_what {train_on_what!r} is not one of {TRAIN_ON}")
    if renderer not in RENDERERS:
        raise RenderError(f"renderer {renderer!r} is not one of {RENDERERS}")
    if "text" in record:
        return Layout(record["text"], [], add_special=False, plain_text=True)
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
    return Layout(text, spans, add_special, prompt, "" if prompt is None else messages[-1]["content"])


def encode(tok: PreTrainedTokenizerBase, layouts: list[Layout]) -> list[Encoded]:
    """Texts in one tokenizer call per add_special_tokens setting (a fast tokenizer encodes a
    batch in parallel, and exactly as it encodes each text alone); eval prompts from their
    texts' ids where _prompt_from_text can, the rest in one more call. Offsets are read one
    text at a time into a flat array: a batch's worth of offset tuples alive at once is enough
    garbage-collector work to trigger a full collection, which costs more than the batch."""
    out: list[Encoded | None] = [None] * len(layouts)
    for add_special in {lay.add_special for lay in layouts}:
        group = [i for i, lay in enumerate(layouts) if lay.add_special == add_special]
        enc = _tokenize(tok, [layouts[i].text for i in group], add_special)
        flat, prompt_ids, tails = array("q"), {}, _Tails(tok)
        for i, ids, encoding in zip(group, enc["input_ids"], enc.encodings):
            offsets, lay = encoding.offsets, layouts[i]
            flat.extend(itertools.chain.from_iterable(offsets))
            if lay.prompt is not None and not add_special:
                prompt_ids[i] = _prompt_from_text(lay, ids, offsets, tails)
        span_weights = _span_weights(np.frombuffer(flat, np.int64).reshape(-1, 2), [len(ids) for ids in enc["input_ids"]],
                                     [layouts[i] for i in group])
        for i, ids, weights in zip(group, enc["input_ids"], span_weights):
            lay = layouts[i]
            if lay.plain_text:
                ids = ids + [tok.eos_token_id]
                weights = [1.0] * len(ids)
            out[i] = Encoded(ids, weights, [], lay.reference)
        rest = [i for i in group if layouts[i].prompt is not None and prompt_ids.get(i) is None]
        prompt_ids |= dict(zip(rest, _tokenize(tok, [layouts[i].prompt for i in rest], add_special)["input_ids"] if rest else []))
        for i, ids in prompt_ids.items():
            out[i].prompt_ids = ids
    return out


class _Tails(dict):
    """(special token id, text after it) -> the ids that text encodes to right after that token,
    or None when encoding the token plus the text does not start with the token."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.tok = tok
        self.specials = {i: t.content for i, t in tok.added_tokens_decoder.items() if not t.normalized}

    def __missing__(self, key: tuple[int, str]) -> list[int] | None:
        ids = self.tok(self.specials[key[0]] + key[1], add_special_tokens=False)["input_ids"]
        self[key] = ids[1:] if ids[:1] == [key[0]] else None
        return self[key]


def _tokenize(tok: PreTrainedTokenizerBase, texts: list[str], add_special: bool) -> dict:
    return tok(texts, add_special_tokens=add_special, return_attention_mask=False, return_token_type_ids=False)


def _prompt_from_text(lay: Layout, ids: list[int], offsets: list[tuple[int, int]], tails: _Tails) -> list[int] | None:
    """The prompt's ids without encoding it: a tokenizer cuts its added (special) tokens out
    before normalizing or splitting anything, so when the prompt is a prefix of the text, the
    text's ids up to the last special token inside the prompt are the prompt's too, and what
    follows that token (the generation header, the same in every record) encodes as it does
    after that token alone: `tails` holds it, once per header. None where that does not hold."""
    n = len(lay.prompt)
    if not lay.text.startswith(lay.prompt):
        return None
    for j in range(len(ids) - 1, -1, -1):
        a, b = offsets[j]
        if b > n or ids[j] not in tails.specials:
            continue
        if lay.text[a:b] != tails.specials[ids[j]]:
            return None
        tail = tails[ids[j], lay.prompt[b:]]
        return None if tail is None else ids[: j + 1] + tail
    return None


def _span_weights(offsets: np.ndarray, counts: list[int], layouts: list[Layout]) -> list[list[float]]:
    """Per text (its `count` rows of the batch's (start, end) offsets), 1.0 for each non-empty
    token that starts inside one of its spans. One search for the whole batch (per text it cost
    more than the tokenizer): each text's offsets and spans are shifted past the previous
    text's end and span ends, so no span reaches another text's tokens; the last span starting
    at or before a token is then the only candidate once spans are sorted and ends run as a
    maximum."""
    reach = [max([len(lay.text), *(end for _, end in lay.spans)]) + 1 for lay in layouts]
    bases = list(itertools.accumulate(reach, initial=0))
    spans = sorted((base + start, base + end) for base, lay in zip(bases, layouts) for start, end in lay.spans)
    inside = np.zeros(len(offsets), dtype=bool)
    if spans:
        starts = offsets[:, 0] + np.repeat(np.asarray(bases[:-1], dtype=np.int64), counts)
        s = np.asarray(spans, dtype=np.int64)
        k = np.searchsorted(s[:, 0], starts, side="right") - 1
        reached = np.maximum.accumulate(s[:, 1])[np.maximum(k, 0)]
        inside = (k >= 0) & (starts < reached) & (offsets[:, 0] < offsets[:, 1])
    weights, ends = inside.astype(float).tolist(), list(itertools.accumulate(counts, initial=0))
    return [weights[a:b] for a, b in zip(ends, ends[1:])]


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

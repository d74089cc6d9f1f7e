"""The tokenized-shard rows are byte-identical to a straightforward oracle: the renderer as
it was before renders were shared, templates rendered directly and tokenizer calls batched
(every prefix rendered anew by apply_chat_template, each text and eval prompt tokenized on
its own), on seeded synthetic records of every
kind, each train_on_what mode, both renderers, chatml and Llama-3 templates (each prefix
rendered) and the built-in ChatML template (one render per conversation), and edge cases
(empty and whitespace content, newlines, unicode, system turns, conversations ending with
a user turn, truncation, records that must fail)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers.processors import TemplateProcessing

from crucible_assets.base import train_tokenizer
import pyarrow.parquet as pq

import crucible_assets.chat_template as chat_template
import crucible_assets.tokenizing as tokenizing
from crucible_assets.rendering import RenderError, _prompt_from_text, _Tails, layout
from crucible_assets.tokenizing import Renderer, pair_row, problem_row, sft_row, tokenize_splits

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
MODES = ("last_assistant_message", "all_assistant_messages", "all_messages")


# --- the oracle: the renderer and row builders before the speedup, kept verbatim in substance


def _template(tok, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# The oracle writes its own spec of the two renderings rather than importing the helpers it checks.
def _prefix_len(text, prefix, i):
    if not text.startswith(prefix):
        raise RenderError(f"messages[:{i}] render differently inside the conversation")
    return len(prefix)


def _role_colon_text(messages):
    """ "Role: content" turns joined by a blank line; (start, end, role) of each content."""
    text, bodies = "", []
    for m in messages:
        label = ("\n\n" if text else "") + m["role"].capitalize() + ": "
        bodies.append((len(text) + len(label) - 1, len(text) + len(label) + len(m["content"]), m["role"]))
        text += label + m["content"]
    return text, bodies


def _role_colon_spans(messages, train_on_what):
    """Weighted spans: the content (with its leading space) and, for a turn a user turn
    follows (or the last turn, which ends in the stop sequence), the "\n\nUser:" ending it."""
    text, bodies = _role_colon_text(messages)
    stop = "\n\nUser:"
    if messages[-1]["role"] == "assistant":
        text += stop
    return text, [(start, end + len(stop) if text[end:end + len(stop)] == stop else end)
                  for start, end, role in bodies if train_on_what == "all_messages" or role == "assistant"]


def oracle_render(tok, record, train_on_what="all_assistant_messages", renderer="chat_template"):
    if "text" in record:
        ids = tok(record["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return ids, [1.0] * len(ids)
    messages = record["messages"]
    if renderer == "chat_template":
        text = _template(tok, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if train_on_what != "all_messages" and m["role"] != "assistant":
                continue
            if train_on_what == "all_messages":
                start = _prefix_len(text, _template(tok, messages[:i], False), i) if i else 0
            else:
                start = _prefix_len(text, _template(tok, messages[:i], True), i)
            spans.append((start, len(_template(tok, messages[: i + 1], False).rstrip())))
        add_special = False
    else:
        text, spans = _role_colon_spans(messages, train_on_what)
        add_special = True
    if train_on_what == "last_assistant_message":
        spans = spans[-1:] if messages[-1]["role"] == "assistant" else []
    enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
    weights = [1.0 if a < b and any(s <= a < e for s, e in spans) else 0.0 for a, b in enc["offset_mapping"]]
    if sum(weights[1:]) == 0:
        raise RenderError(f"loss weights sum to zero with train_on_what={train_on_what!r}: nothing to train on")
    return enc["input_ids"], weights


def oracle_prompt(tok, record, renderer="chat_template"):
    messages = record.get("messages")
    if not messages or messages[-1]["role"] != "assistant":
        return [], ""
    if renderer == "chat_template":
        prompt = tok(_template(tok, messages[:-1], True), add_special_tokens=False)["input_ids"]
    else:
        text, _ = _role_colon_text(messages[:-1])
        prompt = tok(text + "\n\nAssistant:")["input_ids"]
    return prompt, messages[-1]["content"]


def oracle_conversation(r, messages, train_on_what):
    tokens, weights = oracle_render(r.tok, {"messages": messages}, train_on_what, r.renderer)
    r.truncated += len(tokens) > r.max_length
    tokens, weights = tokens[: r.max_length], weights[: r.max_length]
    if sum(weights[1:]) == 0:
        raise RenderError("loss weights sum to zero within max_length")
    return tokens, weights


def oracle_sft(r, record):
    if "text" in record:
        tokens, weights = oracle_render(r.tok, record)
        r.truncated += len(tokens) > r.max_length
        tokens, weights = tokens[: r.max_length], weights[: r.max_length]
    else:
        tokens, weights = oracle_conversation(r, record["messages"], r.train_on_what)
    prompt, reference = oracle_prompt(r.tok, record, r.renderer)
    target_text = r.tok.decode([t for t, w in zip(tokens[1:], weights[1:]) if w > 0])
    return {"tokens": tokens, "weights": weights, "prompt_tokens": prompt, "reference": reference,
            "target_bytes": len(target_text.encode())}


def oracle_pair(r, record):
    row = {}
    for side in ("chosen", "rejected"):
        row[f"{side}_tokens"], row[f"{side}_weights"] = oracle_conversation(r, record[side], "last_assistant_message")
    row["prompt_tokens"], row["reference"] = oracle_prompt(r.tok, {"messages": record["chosen"]}, r.renderer)
    return row


def oracle_problem(r, record):
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    prompt, reference = oracle_prompt(r.tok, {"messages": messages}, r.renderer)
    if len(prompt) > r.max_length:
        raise RenderError("the prompt is longer than max_length")
    return {"prompt_tokens": prompt, "reference": reference}


# --- seeded synthetic records

PIECES = ["What is 3 + 4?", "3 + 4 = 7", " ", "", "\n", "\n\n", "  lead", "trail  ", "User:", "Assistant:", "é☃ 中文",
          "<|im_end|>", "line one\nline two", "42", "a" * 40, "Now add 8.", "x\n\nUser: y", "\t tab"]


def _content(rng):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 4)))


def _conversation(rng, end_with_assistant=True):
    messages = [{"role": "system", "content": _content(rng)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        messages += [{"role": "user", "content": _content(rng)}, {"role": "assistant", "content": _content(rng)}]
    if not end_with_assistant or rng.random() < 0.15:
        messages.append({"role": "user", "content": _content(rng)})
    return messages


def _outcome(f):
    """The row, or the error's kind: both sides must fail on the same records."""
    try:
        return f()
    except RenderError:
        return "RenderError"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(d, 1024, 0)
    chatml = AutoTokenizer.from_pretrained(d)
    chatml.chat_template = (TEMPLATES / "chatml_qwen.jinja").read_text()
    llama3 = AutoTokenizer.from_pretrained(d)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama3.add_special_tokens({"bos_token": specials[0], "additional_special_tokens": specials[1:]})
    bos = llama3.convert_tokens_to_ids(specials[0])
    llama3.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[(specials[0], bos)])
    llama3.chat_template = (TEMPLATES / "llama3.jinja").read_text()
    return {"chatml": chatml, "llama3": llama3, "builtin": AutoTokenizer.from_pretrained(d)}


@pytest.mark.parametrize("style", ["chatml", "llama3", "builtin"])
@pytest.mark.parametrize("renderer", ["chat_template", "role_colon"])
@pytest.mark.parametrize("train_on_what", MODES)
@pytest.mark.parametrize("max_length", [40, 512])
def test_rows_match_the_oracle(tokenizers, style, renderer, train_on_what, max_length):
    tok = tokenizers[style]
    rng = random.Random(f"{style}{renderer}{train_on_what}{max_length}")
    ours, oracle = (Renderer(tok, max_length, train_on_what, renderer) for _ in range(2))
    compared = 0
    for i in range(60):
        sft = {"text": _content(rng)} if i % 10 == 0 else {"messages": _conversation(rng)}
        pair = {"chosen": _conversation(rng), "rejected": _conversation(rng)}
        problem = {"question": _content(rng), "answer": _content(rng)}
        for builder, reference, record in ((sft_row, oracle_sft, sft), (pair_row, oracle_pair, pair),
                                           (problem_row, oracle_problem, problem)):
            got = _outcome(lambda: builder(ours, record, lambda: "r")[0])
            want = _outcome(lambda: reference(oracle, record))
            assert got == want, (builder.__name__, record)
            compared += got != "RenderError"
    assert ours.truncated == oracle.truncated
    assert compared >= 30  # many records render: the comparison is not vacuous



@pytest.mark.parametrize("style", ["chatml", "llama3", "builtin"])
@pytest.mark.parametrize("kind", ["conversations", "pairs"])
def test_tokenize_splits_in_chunks_matches_the_oracle(tokenizers, style, kind, tmp_path, monkeypatch):
    """The shard writer batches records per tokenizer call; chunks of 7 put boundaries everywhere."""
    import json

    monkeypatch.setattr(tokenizing, "CHUNK", 7)
    tok, rng = tokenizers[style], random.Random(f"chunks{style}{kind}")
    oracle = Renderer(tok, 64, "all_assistant_messages", "chat_template")
    records, want = [], []
    while len(records) < 40:
        if kind == "conversations":
            record = {"text": _content(rng)} if len(records) % 10 == 0 else {"messages": _conversation(rng)}
            row = _outcome(lambda: oracle_sft(oracle, record))
        else:
            record = {"chosen": _conversation(rng), "rejected": _conversation(rng)}
            row = _outcome(lambda: oracle_pair(oracle, record))
        if row != "RenderError":
            records.append(record)
            want.append(row)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1:]))
    (tmp_path / "test.jsonl").write_text(json.dumps(records[0]) + "\n")
    summary = tokenize_splits(tmp_path, tmp_path, tok, kind, 64, "all_assistant_messages", "chat_template")
    got = pq.read_table(tmp_path / "test.parquet").to_pylist() + pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert got == [row | {k: [float(x) for x in v] for k, v in row.items() if k.endswith("weights")} for row in want]
    kept = Renderer(tok, 64, "all_assistant_messages", "chat_template")  # truncation of the kept records only
    for record in records:
        (oracle_sft if kind == "conversations" else oracle_pair)(kept, record)
    assert summary["train_truncated"] + summary["test_truncated"] == kept.truncated > 0


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_eval_prompts_reuse_their_texts_ids(tokenizers, style):
    """The shortcut the parity tests above check is taken: the prompt's ids come from the
    text's, the generation header encoded once, and they equal the prompt encoded alone."""
    tok, tails, checked = tokenizers[style], _Tails(tokenizers[style]), 0
    for i in range(12):
        messages = _conversation(random.Random(i))
        lay = layout(tok, {"messages": messages}, "all_assistant_messages", "chat_template", with_prompt=True)
        if lay.prompt is None:  # ends with a user turn: no eval prompt
            continue
        enc = tok(lay.text, add_special_tokens=False, return_offsets_mapping=True)
        got = _prompt_from_text(lay, enc["input_ids"], enc["offset_mapping"], tails)
        assert got == tok(lay.prompt, add_special_tokens=False)["input_ids"]
        checked += 1
    assert checked >= 8 and len(tails) == 1  # one generation header for every record


@pytest.mark.parametrize("train_on_what", MODES)
@pytest.mark.parametrize("max_length", [40, 512])
def test_one_render_equals_the_prefix_renders(tokenizers, train_on_what, max_length, monkeypatch):
    """The built-in ChatML template is turn-local: a conversation renders once and its prefixes
    are cut from that render. Rows from that render equal the rows from rendering every
    prefix (the path the fixture templates, which are not turn-local, take), on several
    assistant turns, system prompts, truncated records, and a message holding the separator,
    which sends its conversation down the prefix path."""
    tok, rng = tokenizers["builtin"], random.Random(f"turns{train_on_what}{max_length}")
    records = [{"messages": _conversation(rng)} for _ in range(40)]
    records.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b" + chat_template.SEPARATOR},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})

    def rows(renderer):
        return [_outcome(lambda: sft_row(renderer, record, lambda: "r")[0]) for record in records]

    fast = rows(Renderer(tok, max_length, train_on_what, "chat_template"))
    monkeypatch.setattr(chat_template, "_COMPILED", {})
    monkeypatch.setattr(chat_template, "_turn_local", lambda tree, variables: False)
    assert chat_template.compiled(tok).separated is None
    slow = Renderer(tok, max_length, train_on_what, "chat_template")
    assert fast == rows(slow)
    assert sum(row != "RenderError" for row in fast) >= (8 if max_length < 100 else 30)  # not vacuous
    assert max_length > 100 or slow.truncated > 0


def test_turn_locality_is_read_from_the_template(tokenizers):
    """The built-in template takes the one-render path; the fixture templates, whose loops read
    `loop.first` or set variables, render every prefix."""
    assert chat_template.compiled(tokenizers["builtin"]).separated is not None
    assert chat_template.compiled(tokenizers["chatml"]).separated is None
    assert chat_template.compiled(tokenizers["llama3"]).separated is None

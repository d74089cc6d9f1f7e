"""chat_sl building blocks: token parity with real-world chat templates, assistant-only
weights, the role_colon renderer, exact packing, chat dataset loaders and chat checks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers.processors import TemplateProcessing

from crucible_assets.base import build_tiny_llama, train_tokenizer
from crucible_assets.checks import validate
from crucible_assets.rendering import RenderError, prompt_and_reference, render, stop_sequences
from resources.datasets.synthetic import arithmetic_chats
from resources.datasets.sources import DatasetConfig, DatasetError, load_records
from resources.datasets.splits import record_identity, split_records
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.local.packing import pack, padding_fraction
from resources.backends.types import Datum

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7"}],
    [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2"},
        {"role": "user", "content": "What was the first number?"},
        {"role": "assistant", "content": " The first number was 1. "},
    ],
]


@pytest.fixture(scope="module")
def base_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(d, 1024, 0)
    return d


def _styled_tokenizer(base_tok_dir, style: str):
    """The base BPE dressed as a real model's tokenizer: its template, its special tokens,
    and for Llama-3 a post-processor that prepends BOS (as Meta's tokenizer does), so a
    renderer that lets the tokenizer add special tokens would double BOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_tok_dir)
    if style == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": LLAMA3_SPECIALS[1:]})
        bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
        tok.chat_template = (TEMPLATES / "llama3.jinja").read_text()
    else:
        tok.chat_template = (TEMPLATES / "chatml_qwen.jinja").read_text()
    return tok


def _weighted_text(tok, ids, weights):
    return tok.decode([t for t, w in zip(ids, weights) if w > 0])


def _template_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(out)


@pytest.mark.parametrize("style,end_of_turn", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_token_parity_with_real_templates(base_tok_dir, style, end_of_turn, conversation):
    tok = _styled_tokenizer(base_tok_dir, style)
    messages = CONVERSATIONS[conversation]
    ids, weights = render(tok, {"messages": messages}, "all_assistant_messages")
    assert ids == _template_ids(tok, messages)
    if style == "llama3":
        assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer would add BOS on its own
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # weights cover exactly each assistant message's content plus its end-of-turn token
    contents = [m["content"].strip() if style == "llama3" else m["content"] for m in messages if m["role"] == "assistant"]
    assert _weighted_text(tok, ids, weights) == "".join(c + end_of_turn for c in contents)
    _, last = render(tok, {"messages": messages}, "last_assistant_message")
    assert _weighted_text(tok, ids, last) == contents[-1] + end_of_turn
    _, every = render(tok, {"messages": messages}, "all_messages")
    assert sum(every) > sum(weights) and all(e >= w for e, w in zip(every, weights))
    assert stop_sequences(tok, "chat_template") == [end_of_turn]


def test_generation_prompt_is_the_template_prefix(base_tok_dir):
    tok = _styled_tokenizer(base_tok_dir, "llama3")
    messages = CONVERSATIONS[1]
    prompt, reference = prompt_and_reference(tok, {"messages": messages})
    assert prompt == list(tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False))
    assert reference == messages[-1]["content"]
    assert prompt.count(tok.bos_token_id) == 1


def test_role_colon_renderer(base_tok_dir):
    tok = _styled_tokenizer(base_tok_dir, "llama3")  # BOS-adding tokenizer: exactly one BOS
    tok.chat_template = None
    messages = CONVERSATIONS[1]
    ids, weights = render(tok, {"messages": messages}, "all_assistant_messages", renderer="role_colon")
    text = tok.decode(ids)
    assert text == ("<|begin_of_text|>System: You add numbers.\n\nUser: What is 1 + 1?\n\nAssistant: 1 + 1 = 2"
                    "\n\nUser: What was the first number?\n\nAssistant:  The first number was 1. \n\nUser:")
    assert ids.count(tok.bos_token_id) == 1
    assert _weighted_text(tok, ids, weights) == " 1 + 1 = 2\n\nUser: " + " The first number was 1. \n\nUser:"
    assert stop_sequences(tok, "role_colon") == ["\n\nUser:"]
    prompt, _ = prompt_and_reference(tok, {"messages": messages}, "role_colon")
    assert tok.decode(prompt).endswith("What was the first number?\n\nAssistant:")
    with pytest.raises(RenderError, match="no chat template"):
        render(tok, {"messages": messages})


def test_zero_weight_example_is_rejected(base_tok_dir):
    tok = _styled_tokenizer(base_tok_dir, "chatml")
    ends_with_user = CONVERSATIONS[1][:-1]
    with pytest.raises(RenderError, match="sum to zero"):
        render(tok, {"messages": ends_with_user}, "last_assistant_message")
    with pytest.raises(RenderError, match="sum to zero"):
        render(tok, {"messages": [{"role": "user", "content": "hi"}]}, "all_assistant_messages")


@pytest.mark.parametrize("kind", ["conversations", "problems"])
def test_overlong_records_are_dropped_and_counted_or_refused(base_tok_dir, tmp_path, kind):
    """One record too long for max_length with nothing left to learn: the default policy
    drops it and counts it (not as truncated); "error" names it; all of a split overlong fails."""
    from crucible_assets.tokenizing import Overlong, tokenize_splits

    tok = _styled_tokenizer(base_tok_dir, "chatml")
    good = CONVERSATIONS[0] if kind == "conversations" else {"question": "What is 3 + 4?", "answer": "7"}
    long = ([{"role": "user", "content": "Please " * 80 + "say hi."}, {"role": "assistant", "content": "Hi"}]
            if kind == "conversations" else {"question": "Please " * 80 + "add 3 and 4.", "answer": "7"})
    wrap = (lambda m: {"messages": m}) if kind == "conversations" else (lambda r: r)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(wrap(r)) + "\n" for r in [good, long, good]))
    (tmp_path / "test.jsonl").write_text(json.dumps(wrap(good)) + "\n")
    args = (tmp_path, tmp_path, tok, kind, 48, "last_assistant_message", "chat_template")

    summary = tokenize_splits(*args)
    assert (summary["train_rows"], summary["train_dropped_overlong"], summary["train_truncated"]) == (2, 1, 0)
    assert pq.read_table(tmp_path / "train.parquet").num_rows == 2
    with pytest.raises(Overlong, match=r"train.jsonl: record 2 .*max_length 48"):
        tokenize_splits(*args, overlong="error")
    (tmp_path / "test.jsonl").write_text(json.dumps(wrap(long)) + "\n")
    with pytest.raises(RenderError, match="every one of the 1 test records is longer than max_length 48"):
        tokenize_splits(*args)


def test_prefix_unstable_template_is_refused(base_tok_dir):
    tok = _styled_tokenizer(base_tok_dir, "chatml")
    tok.chat_template = "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(RenderError, match="prefix"):
        render(tok, {"messages": CONVERSATIONS[0]})


# ---------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------


def test_pack_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(5))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[1], [3, 2], [0, 4]]
    assert padding_fraction(lengths, rows) == pytest.approx(1 - 26 / 30)
    assert padding_fraction(lengths, [[i] for i in range(5)]) == pytest.approx(1 - 26 / 45)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, base_tok_dir):
    d = tmp_path_factory.mktemp("model")
    build_tiny_llama(base_tok_dir, d, 64, 2, 4, 128, 128, 0)
    return d


def _grads(client):
    return {n: p.grad.clone() for n, p in client.model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_unpacked(tiny_model):
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 19, 4, 12, 9, 3]
    examples = []
    for n in lengths:
        tokens = torch.randint(5, 200, (n,), generator=gen).tolist()
        weights = torch.rand(n, generator=gen).round().tolist()
        weights[-1] = 1.0
        examples.append((tokens, weights))
    total = sum(sum(w[1:]) for _, w in examples)  # as the SL loop does: loss = mean NLL per target token
    data = [Datum.from_sequence(t, [x / total for x in w]) for t, w in examples]
    results = {}
    for packing in (False, True):
        client = LocalTorchBackend(device="cpu", precision="fp32", packing=packing, pack_length=24).create_training_client(tiny_model, 0, 0)
        fb = client.forward_backward(data, "cross_entropy")
        results[packing] = (fb, _grads(client), client.compute_logprobs([d.model_input + [d.loss_fn_inputs["target_tokens"][-1]] for d in data]))
    (fb_u, g_u, lp_u), (fb_p, g_p, lp_p) = results[False], results[True]
    assert fb_p.metrics["tokens:slots"] < fb_u.metrics["tokens:slots"]  # packing really happened
    assert fb_p.metrics["tokens:real"] == fb_u.metrics["tokens:real"] == sum(lengths) - len(lengths)
    assert fb_p.metrics["loss:sum"] == pytest.approx(fb_u.metrics["loss:sum"], abs=1e-5)
    for a, b in zip(fb_u.loss_fn_outputs, fb_p.loss_fn_outputs):
        assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    for name in g_u:
        assert torch.allclose(g_u[name], g_p[name], atol=1e-5), name
    for a, b in zip(lp_u, lp_p):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_restarted_positions_alone_do_not_isolate(tiny_model):
    """Guards the mask: without the block-diagonal mask, packed sequences see each other."""
    from resources.backends.local.packing import block_causal_mask

    client = LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny_model, 0, 0)
    a, b = [11, 12, 13, 14], [21, 22, 23]
    ids = torch.tensor([a + b])
    pos = torch.tensor([list(range(4)) + list(range(3))])
    seg = torch.tensor([[0] * 4 + [1] * 3])
    with torch.no_grad():
        alone = client.model(input_ids=torch.tensor([b])).logits[0]
        masked = client.model(input_ids=ids, position_ids=pos, attention_mask=block_causal_mask(seg)).logits[0, 4:]
        leaky = client.model(input_ids=ids, position_ids=pos).logits[0, 4:]
    assert torch.allclose(alone, masked, atol=1e-5)
    assert not torch.allclose(alone, leaky, atol=1e-3)


# ---------------------------------------------------------------------------------------
# chat datasets
# ---------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tinker_cookbook_conversations_with_content_parts(tmp_path):
    path = _write_jsonl(tmp_path / "conversations.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]},
        {"messages": CONVERSATIONS[1]},
    ])
    records = load_records(DatasetConfig(source="jsonl", path=str(path)))
    assert records[0]["messages"][1] == {"role": "assistant", "content": "Hello"}
    assert records[1]["messages"] == CONVERSATIONS[1]
    _write_jsonl(path, [{"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}])
    with pytest.raises(DatasetError, match=r"line 1: field 'messages\[0\].content': part 0"):
        load_records(DatasetConfig(source="jsonl", path=str(path)))


def test_tulu3_schema_through_datasets(tmp_path):
    """allenai/tulu-3-sft-mixture rows: id, messages, source."""
    path = _write_jsonl(tmp_path / "tulu.jsonl", [
        {"id": f"t{i}", "source": "ai2-adapt-dev/flan", "messages": CONVERSATIONS[i % 2]} for i in range(6)
    ])
    records = load_records(DatasetConfig(source="hf", path="json", data_files=[str(path)], num_examples=0))
    assert len(records) == 6 and records[1]["messages"] == CONVERSATIONS[1]
    assert set(records[0]) == {"messages"}


def test_no_robots_schema_through_datasets(tmp_path):
    """HuggingFaceH4/no_robots rows: prompt, prompt_id, messages, category (Parquet)."""
    rows = [{"prompt": "Hi", "prompt_id": f"p{i}", "category": "Chat", "messages": CONVERSATIONS[i % 2]} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    records = load_records(DatasetConfig(source="hf", path="parquet", data_files=[str(tmp_path / "test-00000-of-00001.parquet")]))
    assert [r["messages"] for r in records] == [CONVERSATIONS[i % 2] for i in range(5)]


def test_synthetic_chats_are_seeded_multi_turn():
    a, b = arithmetic_chats(50, 3), arithmetic_chats(50, 3)
    assert a == b and a != arithmetic_chats(50, 4)
    assert all(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in a)
    train, test = split_records(a, 0.2, 0)
    assert len(test) == 12 and not any(t in train for t in test)  # the chats whose seeded hash is under 0.2


def _frame(conversations):
    return pd.DataFrame([{
        "split": "train", "body": json.dumps(c), "identity": record_identity({"messages": c}),
        "assistant_chars": sum(len(m["content"].strip()) for m in c if m["role"] == "assistant"),
        "text_chars": None, "roles": ",".join(m["role"] for m in c),
        "empty_assistant_turns": sum(not m["content"].strip() for m in c if m["role"] == "assistant"),
    } for c in conversations])


def test_chat_checks_pass_on_good_conversations():
    results = validate(_frame(CONVERSATIONS + [c["messages"] for c in arithmetic_chats(20, 0)]))
    assert all(ok for ok, _ in results.values()), {k: v for k, (ok, v) in results.items() if not ok}


@pytest.mark.parametrize("bad,failing", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}], "alternation"),
    ([{"role": "assistant", "content": "a"}], "alternation"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "alternation"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "c"},
      {"role": "assistant", "content": "d"}], "no_empty_assistant_turns"),
    ([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}, {"role": "assistant", "content": "c"}], "roles_valid"),
])
def test_chat_checks_fail_on_bad_conversations(bad, failing):
    results = validate(_frame(CONVERSATIONS + [bad]))
    assert not results[failing][0]
    assert all(ok for name, (ok, _) in results.items() if name not in (failing, "alternation", "roles_valid"))

"""The sampler's own decode loop (resources/backends/local/decode.py) against transformers'
`generate` and the trainer: greedy answers are generate's, token for token; the log-probs
it records are the trainer's for the same tokens; seeds reproduce; stops end a row where
they occur. fp32 on one thread: exact token equality and 1e-4 log-prob agreement hold there."""

import pytest
import torch

from resources.backends.local.backend import LocalTorchBackend
from resources.backends.local.decode import sample_tokens
from resources.backends.types import SamplingParams

PROMPTS = [[5, 17, 42, 99, 7], [12, 300], [64, 65, 66, 67, 68, 69, 70, 71]]  # unequal: left padding is exercised


@pytest.fixture
def client(tiny):
    torch.set_num_threads(1)
    return LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)


def test_greedy_answers_are_generates(client):
    ours = client.sample(PROMPTS, 1, SamplingParams(max_tokens=12, temperature=0.0))
    model = client.model.eval()
    for prompt, (answer,) in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                 eos_token_id=client.tokenizer.eos_token_id, pad_token_id=client.tokenizer.pad_token_id)
        expected = ref[0, len(prompt):].tolist()
        if client.tokenizer.eos_token_id in expected:  # generate keeps the eos, then pads
            expected = expected[: expected.index(client.tokenizer.eos_token_id) + 1]
        assert answer.tokens == expected


def test_recorded_logprobs_are_the_trainers(client):
    groups = client.sample(PROMPTS, 3, SamplingParams(max_tokens=10, temperature=1.0, seed=3))
    for prompt, group in zip(PROMPTS, groups):
        assert len(group) == 3
        for s in group:
            (train_lp,) = client.compute_logprobs([prompt + s.tokens])
            assert train_lp[len(prompt) - 1:] == pytest.approx(s.logprobs, abs=1e-4)


def test_a_seed_reproduces_its_samples_and_another_seed_differs(client):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11)
    first, again = client.sample(PROMPTS, 4, params), client.sample(PROMPTS, 4, params)
    other = client.sample(PROMPTS, 4, params.model_copy(update={"seed": 12}))
    tokens = lambda groups: [s.tokens for g in groups for s in g]  # noqa: E731
    assert tokens(first) == tokens(again) and tokens(first) != tokens(other)


def test_a_stop_string_ends_the_row_where_it_occurs(client):
    (first,) = client.sample(PROMPTS[:1], 1, SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert len(first.tokens) >= 4, "the fixture's greedy answer is too short to place a stop inside it"
    stop = client.tokenizer.decode(first.tokens[:3])[-2:]  # ends at the third token
    (stopped,) = client.sample(PROMPTS[:1], 1, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))[0]
    assert stopped.stop_reason == "stop" and client.tokenizer.decode(stopped.tokens).endswith(stop)
    assert stopped.tokens == first.tokens[: len(stopped.tokens)] and len(stopped.tokens) <= 3


def test_nucleus_keeps_the_top_token_and_records_the_tempered_logprob():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    ids, lps = sample_tokens(logits, temperature=0.5, top_p=1e-6, gen=gen)
    assert ids.tolist() == [0]
    assert lps.item() == pytest.approx(torch.log_softmax(logits / 0.5, dim=-1)[0, 0].item())
    draws = torch.stack([sample_tokens(logits, 1.0, 0.8, gen)[0] for _ in range(400)])
    # softmax([2, 1, 0, -1]) = [0.64, 0.24, 0.09, 0.03]: the 0.8 nucleus is the first two
    assert set(draws.flatten().tolist()) == {0, 1}


def test_draw_follows_the_weights_and_never_picks_a_zero_weight():
    from resources.backends.local.decode import draw

    weights = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    ids = draw(weights, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, weights[0].double(), atol=0.015)  # 3.5 standard errors of 0.5's frequency


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias", "qwen3_qk_norm"])
def test_the_lean_step_computes_the_models_own_forward(family):
    """The preallocated-cache step against transformers' forward with its own cache, token
    after token from a left-padded prefill, at fp32 and under bf16 autocast (measured: equal
    to 1.5e-7 at fp32 and bit for bit at bf16 on an Intel Xeon)."""
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config, Qwen3Config

    from resources.backends.local.lean_step import LeanStep, supports

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config = {"llama_gqa": lambda: LlamaConfig(**common),
              "qwen2_bias": lambda: Qwen2Config(**common),
              "qwen3_qk_norm": lambda: Qwen3Config(head_dim=16, **common)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert supports(model, 20)
    ids = torch.randint(1, 97, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for bf16 in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ours, theirs = DynamicCache(), DynamicCache()
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=ours)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs)
            step = LeanStep(model, ours, mask, 16)
            full_mask, pos = mask, positions[:, -1] + 1
            for token in torch.randint(1, 97, (5, 3)):
                full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
                expected = model(input_ids=token[:, None], attention_mask=full_mask, position_ids=pos[:, None],
                                 cache=theirs).logits[:, -1].float()
                got = step(token, pos).float()
                torch.testing.assert_close(got, expected, atol=1e-2 if bf16 else 1e-6, rtol=0)  # bf16: a few ulps at 0.5
                pos = pos + 1


@pytest.mark.parametrize("lean", [True, False])
def test_rows_that_finish_leave_the_batch_and_the_rest_decode_as_before(client, monkeypatch, lean):
    """A stop token that ends one row early: once finished rows are a quarter of the batch
    they are dropped from it (KV cache and mask), and every other row's answer is unchanged."""
    import resources.backends.local.decode as decode_module

    if not lean:
        monkeypatch.setattr(decode_module, "supports", lambda model, capacity: False)
    pad = client.tokenizer.pad_token_id

    def greedy(stop_ids: list[int]):
        return decode_module.decode(client.model.eval(), PROMPTS, 1, 12, 0.0, 1.0, 0, pad, stop_ids, [], client.tokenizer, "cpu")

    full = greedy([]).tokens_N_S.tolist()
    stop_at = next(i for i, t in enumerate(full[0]) if t not in full[0][:i] and all(t not in a for a in full[1:]))
    dropped = []
    step_class = decode_module.LeanStep if lean else decode_module.HfStep
    real_select = step_class.select
    monkeypatch.setattr(step_class, "select", lambda self, rows: dropped.append(rows.tolist()) or real_select(self, rows))
    out = greedy([full[0][stop_at]])
    assert dropped == [[1, 2]]
    assert out.stopped_at_N == [stop_at, -1, -1]
    assert out.tokens_N_S[0].tolist() == full[0][: stop_at + 1] + [pad] * (11 - stop_at)
    assert out.tokens_N_S[1:].tolist() == full[1:]


def test_the_lean_step_refuses_what_it_does_not_compute():
    """MLP biases, length-dependent rotary frequencies and sliding windows keep the generic
    step (each measured to give wrong logits through the lean one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from resources.backends.local.lean_step import supports

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    decisions = {
        "llama": (LlamaConfig(**common), True),
        "llama3 rope": (LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **common), True),
        "mlp bias": (LlamaConfig(mlp_bias=True, **common), False),
        "dynamic rope": (LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **common), False),
        "mistral window under capacity": (MistralConfig(sliding_window=4, layer_types=["full_attention"] * 2, **common), False),
        "mistral without window": (MistralConfig(sliding_window=None, **common), True),
        "qwen2 sliding layers": (Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, **common), False),
    }
    got = {name: supports(AutoModelForCausalLM.from_config(config), 16) for name, (config, _) in decisions.items()}
    assert got == {name: expected for name, (_, expected) in decisions.items()}


def test_draw_refuses_weights_it_cannot_sample():
    from resources.backends.local.decode import draw

    gen = torch.Generator().manual_seed(0)
    for bad in ([0.0, 0.0, 0.0], [0.5, float("nan"), 0.5]):
        with pytest.raises(ValueError, match="all zero or not finite"):
            draw(torch.tensor([bad]), gen)

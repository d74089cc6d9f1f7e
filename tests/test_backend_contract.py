"""The training-backend contract, one set of tests run against LocalTorchBackend and against
TinkerBackend (the real `tinker` SDK types, served by the in-process stand-in in
tinker_standin.py): datum conventions, each built-in loss equal to its formula on a
hand-made batch, custom losses, sampling shapes and log-probs, save/load round trips. Then
the Tinker side's failure behaviour: auth errors, retries, exhausted retries, no hang."""

from __future__ import annotations

import json
import logging
import time

import pytest
import tinker
import torch

from crucible_assets.base import build_tiny_llama, train_tokenizer
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.tinker.retries import BackendAuthError, BackendUnavailableError, RetryPolicy, resolve
from resources.backends.tinker.backend import API_KEY_ENV, POINTER_FILE, TinkerBackend, classify
from resources.backends.types import AdamParams, Datum, SamplingParams
from tinker_standin import HANG, TinkerStandIn, connection_error, status_error

RANK = 4
KEY = "standin-secret-key-123"
SEQ_A = [5, 17, 42, 99, 7, 300, 12, 64]
W_A = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0]
SEQ_B = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
W_B = [0.0] + [1.0] * (len(SEQ_B) - 1)
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    tok_dir, model_dir = root / "tok", root / "model"
    train_tokenizer(tok_dir, 1024, 0)
    build_tiny_llama(tok_dir, model_dir, 32, 1, 2, 64, 64, 0)
    return model_dir


@pytest.fixture
def standin(tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    return TinkerStandIn(tmp_path / "service", api_key=KEY).install(monkeypatch)


def tinker_backend(**overrides) -> TinkerBackend:
    return TinkerBackend(**({"retry_base_delay_s": 0.01, "retry_max_delay_s": 0.05} | overrides))


@pytest.fixture(params=["local", "tinker"])
def backend(request):
    if request.param == "local":
        return LocalTorchBackend(device="cpu", precision="fp32")
    request.getfixturevalue("standin")
    return tinker_backend()


def batch() -> list[Datum]:
    return [Datum.from_sequence(SEQ_A, W_A), Datum.from_sequence(SEQ_B, W_B)]


def logprobs_of(client, data: list[Datum]) -> list[torch.Tensor]:
    """Target log-probs of each datum, from compute_logprobs on the full sequences."""
    seqs = [d.model_input + [d.loss_fn_inputs["target_tokens"][-1]] for d in data]
    return [torch.tensor(lp) for lp in client.compute_logprobs(seqs)]


def test_datum_convention(backend, tiny):
    d = Datum.from_sequence(SEQ_A, W_A, advantages=[float(i) for i in range(len(SEQ_A))])
    assert d.model_input == SEQ_A[:-1] and d.loss_fn_inputs["target_tokens"] == SEQ_A[1:]
    assert d.loss_fn_inputs["weights"] == W_A[1:] and d.loss_fn_inputs["advantages"] == [float(i) for i in range(1, 8)]
    with pytest.raises(ValueError):
        Datum(model_input=[1, 2, 3], loss_fn_inputs={"weights": [1.0]})
    client = backend.create_training_client(tiny, RANK, 0)
    out = client.forward_backward(batch(), "cross_entropy")
    assert [len(o["logprobs"]) for o in out.loss_fn_outputs] == [len(SEQ_A) - 1, len(SEQ_B) - 1]
    lps = client.compute_logprobs([SEQ_A, SEQ_B])
    assert [len(lp) for lp in lps] == [len(SEQ_A) - 1, len(SEQ_B) - 1]
    for o, lp in zip(out.loss_fn_outputs, lps):
        assert torch.allclose(o["logprobs"], torch.tensor(lp), **TOL)


def test_cross_entropy_is_weighted_sum(backend, tiny):
    client = backend.create_training_client(tiny, RANK, 0)
    lps = logprobs_of(client, batch())
    expected = -sum((torch.tensor(d.loss_fn_inputs["weights"]) * lp).sum() for d, lp in zip(batch(), lps))
    out = client.forward_backward(batch(), "cross_entropy")
    assert out.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-4)


def rl_batch(client, shift: float) -> tuple[list[Datum], list[torch.Tensor]]:
    """Sampler log-probs off by `shift` (so ratios are exp(shift)) and mixed-sign advantages."""
    plain = batch()
    lps = logprobs_of(client, plain)
    data = []
    for i, (d, lp) in enumerate(zip(plain, lps)):
        adv = [(-1.0) ** (i + j) * (0.5 + j / 10) for j in range(len(lp))]
        data.append(Datum(model_input=d.model_input, loss_fn_inputs={**d.loss_fn_inputs, "logprobs": (lp - shift).tolist(), "advantages": adv}))
    return data, lps


def test_importance_sampling_formula(backend, tiny):
    client = backend.create_training_client(tiny, RANK, 0)
    data, lps = rl_batch(client, 0.1)
    expected = -sum((torch.exp(lp - torch.tensor(d.loss_fn_inputs["logprobs"])) * torch.tensor(d.loss_fn_inputs["advantages"])).sum()
                    for d, lp in zip(data, lps))
    out = client.forward_backward(data, "importance_sampling")
    assert out.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("shift", [0.05, 0.5])  # inside and outside the clip range
def test_ppo_formula(backend, tiny, shift):
    client = backend.create_training_client(tiny, RANK, 0)
    data, lps = rl_batch(client, shift)
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    expected = 0.0
    for d, lp in zip(data, lps):
        ratio = torch.exp(lp - torch.tensor(d.loss_fn_inputs["logprobs"]))
        adv = torch.tensor(d.loss_fn_inputs["advantages"])
        expected -= torch.minimum(ratio * adv, ratio.clamp(0.9, 1.1) * adv).sum().item()
    out = client.forward_backward(data, "ppo", config)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)


def test_custom_loss_matches_builtin_and_sees_our_datums(backend, tiny):
    seen = {}

    def weighted_nll(data, logprobs):
        seen["types"] = {type(d) for d in data}
        seen["inputs"] = set(data[0].loss_fn_inputs)
        loss = -sum((torch.tensor(d.loss_fn_inputs["weights"]) * lp).sum() for d, lp in zip(data, logprobs))
        return loss, {"custom_metric": 7.0}

    adam = AdamParams(learning_rate=0.05)
    builtin, custom = backend.create_training_client(tiny, RANK, 0), backend.create_training_client(tiny, RANK, 0)
    data = [Datum.from_sequence(SEQ_A, W_A, advantages=[0.0] * len(SEQ_A)), Datum.from_sequence(SEQ_B, W_B, advantages=[0.0] * len(SEQ_B))]
    builtin.forward_backward(batch(), "cross_entropy")
    out = custom.forward_backward_custom(data, weighted_nll)
    assert seen == {"types": {Datum}, "inputs": {"target_tokens", "weights", "advantages"}}
    assert out.metrics["custom_metric"] == 7.0
    assert [len(o["logprobs"]) for o in out.loss_fn_outputs] == [len(SEQ_A) - 1, len(SEQ_B) - 1]
    builtin.optim_step(adam), custom.optim_step(adam)
    after_builtin, after_custom = logprobs_of(builtin, batch()), logprobs_of(custom, batch())
    before = logprobs_of(backend.create_training_client(tiny, RANK, 0), batch())
    assert not torch.allclose(after_custom[0], before[0], atol=1e-3)  # the custom gradient was applied
    for a, b in zip(after_builtin, after_custom):
        assert torch.allclose(a, b, atol=1e-4)


def test_sampling_shapes_and_logprobs(backend, tiny):
    client = backend.create_training_client(tiny, RANK, 0)
    prompts = [SEQ_A[:4], SEQ_B[:6]]
    groups = client.sample(prompts, 3, SamplingParams(max_tokens=5, temperature=1.0, seed=3))
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(prompts, groups):
        for s in group:
            assert 1 <= len(s.tokens) <= 5 and len(s.logprobs) == len(s.tokens)
            assert s.stop_reason in ("stop", "length") and (s.stop_reason == "stop" or len(s.tokens) == 5)
            scored = client.compute_logprobs([prompt + s.tokens])[0][len(prompt) - 1:]
            assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(scored), atol=1e-3)
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    assert [s.tokens for s in client.sample(prompts, 1, greedy)[0]] == [s.tokens for s in client.sample(prompts, 1, greedy)[0]]


def train_steps(client, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        losses.append(client.forward_backward(batch(), "cross_entropy").metrics["loss:sum"])
        client.optim_step(AdamParams(learning_rate=0.05))
    return losses


def test_save_load_resumes_same_next_step(backend, tiny, tmp_path):
    client = backend.create_training_client(tiny, RANK, 0)
    train_steps(client, 2)
    client.save_state(tmp_path / "state")
    continued = train_steps(client, 2)
    resumed_client = backend.create_training_client(tiny, RANK, 0)
    resumed_client.load_state(tmp_path / "state", with_optimizer=True)
    assert train_steps(resumed_client, 2) == pytest.approx(continued, rel=1e-5)
    fresh_optimizer = backend.create_training_client(tiny, RANK, 0)
    fresh_optimizer.load_state(tmp_path / "state", with_optimizer=False)
    weights_only = train_steps(fresh_optimizer, 2)
    assert weights_only[0] == pytest.approx(continued[0], rel=1e-5)  # same weights
    assert weights_only[1] != pytest.approx(continued[1], rel=1e-6)  # but Adam restarted


def test_saved_sampler_weights_load_as_a_model(backend, tiny, tmp_path):
    client = backend.create_training_client(tiny, RANK, 0)
    train_steps(client, 2)
    client.save_weights_for_sampler(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer.json").exists()
    reloaded = backend.create_training_client(tmp_path / "model", 0, 0)
    for a, b in zip(logprobs_of(client, batch()), logprobs_of(reloaded, batch())):
        assert torch.allclose(a, b, atol=1e-4)


def test_tinker_path_computes_what_the_local_backend_computes(standin, tiny):
    """The stand-in runs the local backend underneath, so any difference is the Tinker
    adapter's doing: conversions, shifts, the custom-loss round trip, optimizer params."""
    def pairwise(data, logprobs):  # a DPO-shaped loss: depends on both sequences at once
        a, b = [(torch.tensor(d.loss_fn_inputs["weights"]) * lp).sum() for d, lp in zip(data, logprobs)]
        return -torch.nn.functional.logsigmoid(a - b), {}

    runs = []
    for backend in (LocalTorchBackend(device="cpu", precision="fp32"), tinker_backend()):
        client = backend.create_training_client(tiny, RANK, 0)
        losses = []
        for _ in range(3):
            losses.append(client.forward_backward_custom(batch(), pairwise).loss_fn_outputs[0]["logprobs"].sum().item())
            client.optim_step(AdamParams(learning_rate=0.05))
        runs.append(losses + [lp.sum().item() for lp in logprobs_of(client, batch())])
    assert runs[0] != pytest.approx(runs[0][:1] * len(runs[0]))  # training moved the model
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


# -- the Tinker side: what the service sees, and failures ------------------------------------


def test_tinker_sends_sdk_types_and_records_paths_not_the_key(standin, tiny, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    backend = tinker_backend()
    client = backend.create_training_client(tiny, RANK, 0)
    train_steps(client, 1)
    client.save_weights_for_sampler(tmp_path / "model")
    pointer = json.loads((tmp_path / "model" / POINTER_FILE).read_text())
    assert pointer["lora_rank"] == RANK and pointer["base_model"] == str(tiny)
    for field in ("sampler_path", "state_path", "hf_weights_path"):
        assert pointer[field].startswith("tinker://")
    out = tmp_path / "export"
    files = backend.export_weights(tmp_path / "model", out)
    assert "model.safetensors" in files and (out / "config.json").exists()
    text = json.dumps(backend.identity()) + json.dumps(pointer) + caplog.text
    assert KEY not in text


def test_tinker_continues_training_from_a_checkpoint_dir(standin, tiny, tmp_path):
    backend = tinker_backend()
    client = backend.create_training_client(tiny, RANK, 0)
    train_steps(client, 2)
    client.save_weights_for_sampler(tmp_path / "model")
    follow_up = backend.create_training_client(tmp_path / "model", 0, 0)
    assert follow_up.forward_backward(batch(), "cross_entropy").metrics["loss:sum"] == pytest.approx(
        client.forward_backward(batch(), "cross_entropy").metrics["loss:sum"], rel=1e-5)
    with pytest.raises(ValueError, match="LoRA rank 4"):
        backend.create_training_client(tmp_path / "model", 8, 0)


def test_tinker_rejects_unknown_model_listing_served_ones(standin, tiny, tmp_path):
    standin.models["Qwen/Qwen3-8B"] = tiny
    client = tinker_backend(base_model="no/such-model").create_training_client(tiny, RANK, 0)
    with pytest.raises(ValueError, match=r"no/such-model.*Qwen/Qwen3-8B"):
        client.forward_backward(batch(), "cross_entropy")


def test_tinker_auth_failure_is_clear_and_not_retried(standin, tiny, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "wrong-key")
    client = tinker_backend().create_training_client(tiny, RANK, 0)
    with pytest.raises(BackendAuthError, match=API_KEY_ENV):
        client.sample([SEQ_A[:4]], 1, SamplingParams(max_tokens=2))
    assert standin.calls["create_sampling_client"] == 1


def test_tinker_missing_key_fails_before_any_request(standin, tiny, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV)
    with pytest.raises(BackendAuthError, match=API_KEY_ENV):
        tinker_backend().create_training_client(tiny, RANK, 0)
    assert sum(standin.calls.values()) == 0


def test_tinker_retries_transient_errors(standin, tiny):
    client = tinker_backend().create_training_client(tiny, RANK, 0)
    standin.fail_next("sample", status_error(tinker.RateLimitError, 429, "slow down"),
                      status_error(tinker.InternalServerError, 503, "unavailable"), connection_error())
    standin.fail_next("forward_backward", status_error(tinker.InternalServerError, 500, "oops"))
    groups = client.sample([SEQ_A[:4]], 2, SamplingParams(max_tokens=3))
    assert [len(g) for g in groups] == [2] and standin.calls["sample"] == 4
    client.forward_backward(batch(), "cross_entropy")
    assert standin.calls["forward_backward"] == 2


def test_tinker_bad_request_is_not_retried(standin, tiny):
    client = tinker_backend().create_training_client(tiny, RANK, 0)
    standin.fail_next("optim_step", status_error(tinker.BadRequestError, 400, "bad params"))
    client.forward_backward(batch(), "cross_entropy")
    with pytest.raises(tinker.BadRequestError):
        client.optim_step(AdamParams(learning_rate=0.01))
    assert standin.calls["optim_step"] == 1


def test_tinker_gives_up_when_retries_run_out(standin, tiny):
    client = tinker_backend(max_attempts=3).create_training_client(tiny, RANK, 0)
    standin.fail_next("compute_logprobs", *[status_error(tinker.InternalServerError, 502, "bad gateway")] * 5)
    with pytest.raises(BackendUnavailableError, match="3 attempt"):
        client.compute_logprobs([SEQ_A])
    assert standin.calls["compute_logprobs"] == 3


def test_tinker_sampling_never_hangs(standin, tiny):
    client = tinker_backend(call_deadline_s=1.0).create_training_client(tiny, RANK, 0)
    client.sample([SEQ_A[:4]], 1, SamplingParams(max_tokens=2))  # warm: the sampler exists
    standin.fail_next("sample", *[HANG] * 10)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="sample"):
        client.sample([SEQ_A[:4], SEQ_B[:4]], 1, SamplingParams(max_tokens=2))
    assert time.monotonic() - start < 5.0


def fake_time():
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    return sleeps, sleep, lambda: now[0]


def flaky(failures: int):
    calls = []

    def submit():
        calls.append(1)
        if len(calls) <= failures:
            raise status_error(tinker.InternalServerError, 503, "busy")
        return 42

    return calls, submit


def test_backoff_is_exponential_capped_and_within_the_deadline():
    sleeps, sleep, clock = fake_time()
    calls, submit = flaky(4)
    policy = RetryPolicy(max_attempts=6, base_delay_s=1.0, max_delay_s=3.0, deadline_s=100.0)
    assert resolve(submit, "op", policy, classify, sleep=sleep, clock=clock) == 42
    assert sleeps == [1.0, 2.0, 3.0, 3.0] and len(calls) == 5
    sleeps, sleep, clock = fake_time()
    calls, submit = flaky(10)
    with pytest.raises(BackendUnavailableError, match="3 attempt"):  # 1 + 2 s slept; waiting 4 more would pass 5 s
        resolve(submit, "op", RetryPolicy(max_attempts=10, base_delay_s=1.0, max_delay_s=30.0, deadline_s=5.0),
                classify, sleep=sleep, clock=clock)
    assert sleeps == [1.0, 2.0]

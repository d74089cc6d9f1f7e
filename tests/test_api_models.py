"""The hosted-model layer (resources/api_models/) against local stand-ins of the three
providers' wire formats (tests/api_standins.py), through the official SDKs: success, a 429
with Retry-After, 5xx, a malformed answer, a timeout at the deadline, the cache (a second run
makes zero calls), hedging (a stalled copy does not hold the call; p99 with and without
hedging over 200 calls to a heavy-tailed stand-in), and a missing key named before anything
runs."""

import random
import time

import pytest

from api_standins import BASE_URLS, KEY, StandIn, serve
from resources.api_models.calls import ApiModelClient, CallFailed, CallSettings
from resources.api_models.resource import ApiModelsResource, MissingKey

PROVIDERS = ["openai", "anthropic", "google"]
ASK = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 16}


@pytest.fixture
def stand_in():
    s = StandIn()
    base, stop = serve(s)
    s.base = base
    yield s
    stop()


def client(stand_in, provider, tmp_path, **settings) -> ApiModelClient:
    defaults = {"backoff_s": 0.01, "hedge": False}
    return ApiModelClient(provider, "stand-in-1", KEY, BASE_URLS[provider].format(base=stand_in.base),
                          CallSettings(**(defaults | settings)), tmp_path / "cache")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_provider_answers_through_its_sdk_and_a_second_run_makes_no_call(stand_in, provider, tmp_path):
    (answer,) = client(stand_in, provider, tmp_path).complete([ASK])
    assert answer.text == "echo: What is 2 + 3?" and answer.input_tokens == 11 and answer.output_tokens == 6
    sent = stand_in.bodies[-1][1]
    assert "Be brief." in str(sent) and stand_in.calls[provider] == 1  # the system prompt went where the provider wants it
    again = client(stand_in, provider, tmp_path)
    assert again.complete([ASK]) == [answer] and stand_in.calls[provider] == 1
    assert again.report()["cache_hits"] == 1 and again.report()["calls"] == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_with_retry_after_5xx_and_malformed_answers_are_retried(stand_in, provider, tmp_path):
    stand_in.plan.extend([("status", 429, 0.3), ("status", 503, None), "malformed"])
    c = client(stand_in, provider, tmp_path)
    t0 = time.monotonic()
    (answer,) = c.complete([ASK])
    assert answer.text.startswith("echo:") and stand_in.calls[provider] == 4 and c.report()["retries"] == 3
    assert time.monotonic() - t0 >= 0.3  # the Retry-After was honoured


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_client_error_is_not_retried_and_names_the_status(stand_in, provider, tmp_path):
    stand_in.plan.append(("status", 400, None))
    with pytest.raises(CallFailed, match="400"):
        client(stand_in, provider, tmp_path).complete([ASK])
    assert stand_in.calls[provider] == 1


def test_a_call_that_never_answers_fails_at_its_deadline(stand_in, tmp_path):
    stand_in.default = ("stall", 30)
    t0 = time.monotonic()
    with pytest.raises(CallFailed, match="deadline"):
        client(stand_in, "openai", tmp_path, deadline_s=1.0, timeout_s=20).complete([ASK])
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_stalled_copy_is_hedged_and_the_call_returns_at_the_hedge_delay(stand_in, provider, tmp_path):
    stand_in.plan.append(("stall", 20))
    c = client(stand_in, provider, tmp_path, hedge=True, hedge_initial_s=0.3, hedge_budget=1.0)
    t0 = time.monotonic()
    (answer,) = c.complete([ASK])
    took = time.monotonic() - t0
    assert answer.text.startswith("echo:") and 0.3 <= took < 3, took
    assert stand_in.calls[provider] == 2 and c.report()["hedged"] == 1


def test_hedging_cuts_the_p99_of_a_heavy_tail(stand_in, tmp_path, capsys):
    """200 calls, 20 in flight; ten of them (seeded) take 2 s the first time the stand-in sees
    them, the rest and every second copy 10-30 ms: a tail a second try escapes, which is what
    hedging is for. (Drawing slowness per arrival made a hedge copy slow 5% of the time, and
    the test failed whenever two copies were.)"""
    def run(hedge: bool) -> dict:
        rng = random.Random(1)
        slow, seen = {f"What is 2 + {i}?" for i in rng.sample(range(200), 10)}, set()

        def latency(body: dict) -> float:
            question = body["messages"][-1]["content"]
            first = question not in seen
            seen.add(question)
            return 2.0 if first and question in slow else rng.uniform(0.01, 0.03)

        stand_in.latency = latency
        c = client(stand_in, "openai", tmp_path / str(hedge), hedge=hedge, max_concurrency=20, hedge_percentile=0.9,
                   hedge_initial_s=0.1, hedge_budget=0.2)
        c.complete([{**ASK, "messages": [*ASK["messages"][:-1], {"role": "user", "content": f"What is 2 + {i}?"}]}
                    for i in range(200)])
        return c.report()

    plain, hedged = run(False), run(True)
    with capsys.disabled():
        print(f"\nheavy tail, 200 calls: p99 without hedging {plain['p99_s']:.3f} s, with {hedged['p99_s']:.3f} s "
              f"({hedged['hedged']} hedged); p50 {plain['p50_s']:.3f} / {hedged['p50_s']:.3f} s")
    assert plain["p99_s"] > 1.9 and hedged["p99_s"] < 0.5
    assert 0 < hedged["hedged"] <= 0.2 * 200 and hedged["attempts"] == 200 + hedged["hedged"]


def test_a_missing_key_is_named_before_anything_runs(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    resource = ApiModelsResource(provider="anthropic", model="claude-x")
    with pytest.raises(MissingKey, match="ANTHROPIC_API_KEY"):
        resource.setup_for_execution(None)
    ApiModelsResource(provider="anthropic").setup_for_execution(None)  # no model configured: nothing to check

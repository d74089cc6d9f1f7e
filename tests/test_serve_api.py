"""`crucible serve` through the `openai` client, as users call it: chat completions, streaming,
n > 1, stop sequences, completions; the OpenAI error object for bad requests while the server
keeps serving; feedback by response id; metrics; the alias followed under load with zero
failed requests. Two versions of a tiny model are published into a fresh store and registry
by hand (no training: these tests are about the server), served by uvicorn in this process."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.serving import perturbed, publish, start_server
from crucible_jobs.serving.server import build
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """sl_basic:1 (champion) and sl_basic:2 in a fresh home; the server follows sl_basic@champion."""
    home = tmp_path_factory.mktemp("serve_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRUCIBLE_HOME", str(home))
        store, registry = ArtifactStore(), ModelRegistry()
        publish(store, registry, "sl_basic", tiny, "a" * 64)
        registry.promote("sl_basic:1", "champion", "the first version")
        publish(store, registry, "sl_basic", perturbed(tiny, home / "other"), "b" * 64)
        # threads left alone: torch's count is process-wide, and this fixture outlives the per-test restore
        app = build("sl_basic", precision="fp32", max_tokens=24, poll_seconds=0.2, registry=registry, store=store)
        base, uv, thread = start_server(app)
        yield {"base": base, "registry": registry, "home": home}
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "What is 12 + 7?"}]


def test_a_chat_completion_names_the_exact_version_that_answered(client, server):
    r = client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.model_extra["model_version"] == r.system_fingerprint == "sl_basic:1"
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    again = client.chat.completions.create(model="sl_basic@champion", max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is 12"}, {"type": "text", "text": " + 7?"}]}])
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy is greedy; parts are joined


def test_streaming_sends_the_same_text_in_pieces(client):
    whole = client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.model_extra["model_version"] for c in chunks} == {"sl_basic:1"}


def test_n_choices_are_drawn_apart_and_a_seed_repeats_them(client):
    ask = dict(model="sl_basic", messages=ASK, max_tokens=12, temperature=1.0, n=4, seed=3)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3] and len(set(texts)) > 1
    assert [c.message.content for c in again.choices] == texts


def test_a_stop_sequence_ends_the_answer_before_it(client):
    free = client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=20, temperature=0).choices[0]
    stop = free.message.content[6:9]
    cut = client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == free.message.content[:free.message.content.find(stop)]


def test_completions_continue_a_raw_prompt(client):
    r = client.completions.create(model="sl_basic", prompt="What is 2 + 2?", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.model_extra["model_version"] == "sl_basic:1"


@pytest.mark.parametrize("body, status, code, says", [
    (b"{not json", 400, None, "not valid JSON"),
    (json.dumps({"model": "nope", "messages": ASK}).encode(), 404, "model_not_found", "not served here"),
    (json.dumps({"model": "sl_basic", "messages": ASK, "max_tokens": 5000}).encode(), 400, "context_length_exceeded",
     "context length of 256"),
    (json.dumps({"model": "sl_basic", "messages": ASK, "temperature": 7}).encode(), 400, None, "temperature"),
    (json.dumps({"model": "sl_basic", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, None, "messages.0.role"),
    (json.dumps({"model": "sl_basic", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, None,
     "only text content parts"),
    (json.dumps({"model": "sl_basic", "messages": ASK, "stop": "x" * 10 + "\n" * (2 << 20)}).encode(), 413, None, "larger than"),
])
def test_a_bad_request_gets_the_openai_error_object_and_the_server_keeps_serving(server, client, body, status, code, says):
    r = httpx.post(f"{server['base']}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["code"] == code and error["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=4).choices[0].message.content is not None


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=10_000)


def test_feedback_names_a_response_by_id_and_lands_in_the_feedback_folder(client, server):
    r = client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=8, n=2, temperature=1.0, seed=1)
    ok = httpx.post(f"{server['base']}/v1/feedback", json={"response_id": r.id, "choice": 1, "rating": 2,
                                                            "edited_response": "12 + 7 = 19"})
    assert ok.status_code == 200 and ok.json()["model_version"] == "sl_basic:1"
    (path,) = (server["home"] / "feedback").glob("served-*.jsonl")
    record = json.loads(path.read_text().splitlines()[-1])
    assert record == {"prompt": ASK, "response": r.choices[1].message.content, "rating": 2.0,
                      "edited_response": "12 + 7 = 19", "model_version": "sl_basic:1"}
    for body, status in [({"response_id": "chatcmpl-unknown", "rating": 4}, 404), ({"response_id": r.id, "rating": 6}, 400),
                         ({"response_id": r.id, "rating": 4, "choice": 5}, 404), ({"rating": 4}, 400)]:
        bad = httpx.post(f"{server['base']}/v1/feedback", json=body)
        assert bad.status_code == status and "error" in bad.json()
    assert len(path.read_text().splitlines()) == 1  # a refused feedback writes nothing


def test_health_models_and_metrics(client, server):
    assert client.models.list().data[0].id == "sl_basic"
    health = httpx.get(f"{server['base']}/health").json()
    assert health["status"] == "ok" and health["follows"] == "sl_basic@champion"
    metrics = httpx.get(f"{server['base']}/metrics").text
    for series in ('crucible_serve_requests_total{endpoint="/v1/chat/completions",status="200"}',
                   'crucible_serve_tokens_total{kind="completion"}', "crucible_serve_request_seconds_bucket",
                   "crucible_serve_batch_rows_bucket"):
        assert series in metrics


def test_the_alias_moves_under_load_with_no_failed_request(server):
    """64 requests 20 ms apart; the champion moves to v2 a third of the way in; 8 more once the
    server reports v2. None fails, each names the version that answered, and every request sent
    after the server reports v2 gets v2."""
    async def load():
        client = openai.AsyncOpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0)
        moved_at, results = None, []

        async def ask(i):
            sent = time.monotonic()
            r = await client.chat.completions.create(model="sl_basic", messages=ASK, max_tokens=24, temperature=0)
            results.append((sent, r.model_extra["model_version"], r.choices[0].message.content))

        tasks = []
        for i in range(64):
            tasks.append(asyncio.create_task(ask(i)))
            await asyncio.sleep(0.02)
            if i == 20:
                await asyncio.to_thread(server["registry"].promote, "sl_basic:2", "champion", "test: move under load")
        async with httpx.AsyncClient() as h:  # a deadline for a busy machine, not a timing assertion
            for _ in range(600):
                if (await h.get(f"{server['base']}/health")).json()["model_version"] == "sl_basic:2":
                    moved_at = time.monotonic()
                    break
                await asyncio.sleep(0.1)
        tasks += [asyncio.create_task(ask(64 + i)) for i in range(8)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        return outcomes, results, moved_at

    try:
        outcomes, results, moved_at = asyncio.run(load())
    finally:
        server["registry"].rollback("sl_basic", "champion", "test: back to v1")
        deadline = time.monotonic() + 30
        while httpx.get(f"{server['base']}/health").json()["model_version"] != "sl_basic:1" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert moved_at is not None, "the server never reported the new champion"
    versions = {v for _, v, _ in results}
    assert versions == {"sl_basic:1", "sl_basic:2"}
    assert {v for sent, v, _ in results if sent > moved_at} == {"sl_basic:2"}
    answers = {v: {t for _, w, t in results if w == v} for v in versions}
    assert len(answers["sl_basic:1"]) == len(answers["sl_basic:2"]) == 1 and answers["sl_basic:1"] != answers["sl_basic:2"]


def test_a_model_missing_from_the_registry_fails_at_start_naming_it(tmp_path):
    crucible = Path(sys.executable).parent / "crucible"
    out = subprocess.run([str(crucible), "serve", "nosuch", "--port", str(free_port())], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "CRUCIBLE_HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 2 and "no registered model named 'nosuch'" in out.stderr
    assert "Uvicorn running" not in out.stderr + out.stdout

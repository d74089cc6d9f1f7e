"""`crucible serve`'s continuous-batching engine (crucible_jobs/serving/engine.py) on a tiny
model: requests that join a batch in flight get exactly the answer they get alone (greedy,
fp32, one thread); a seeded request draws the same text whatever shares its batch; stop
strings end an answer and are never sent, even in pieces; a swap lets the rows in flight
finish on the old model."""

import threading
import time

import pytest
import torch

from crucible_jobs.serving.engine import BatchingEngine, LoadedModel, Request, _safe_end
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.types import SamplingParams

PROMPTS = [[5, 17, 42, 99, 7], [12, 300], [64, 65, 66, 67, 68, 69, 70, 71], [9] * 20, [200, 201]]


@pytest.fixture
def client(tiny):
    torch.set_num_threads(1)
    return LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)


def loaded(client, version="tiny:1") -> LoadedModel:
    return LoadedModel(client.model.eval(), client.tokenizer, version, 256, [client.tokenizer.eos_token_id])


class Collect:
    """A request's events, gathered; `done` is set when every choice finished (or it failed)."""

    def __init__(self, prompt, n=1, **kw):
        self.events, self.texts, self.finish = [], [""] * n, [None] * n
        self.done = threading.Event()
        self.request = Request(render=lambda _tok: list(prompt), sink=self.sink, n=n, **kw)

    def sink(self, ev):
        self.events.append(ev)
        if ev[0] == "text":
            self.texts[ev[1]] += ev[2]
        elif ev[0] == "done":
            self.finish[ev[1]] = ev[2]
        if ev[0] == "error" or None not in self.finish:
            self.done.set()


def run(engine, calls, gap=0.0):
    for c in calls:
        engine.submit(c.request)
        time.sleep(gap)
    for c in calls:
        assert c.done.wait(60), c.events[-3:]
    return calls


def alone(client, prompt, max_tokens):
    (s,), = client.sample([prompt], 1, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return client.tokenizer.decode([t for t in s.tokens if t != client.tokenizer.eos_token_id], skip_special_tokens=True)


def test_requests_joining_a_batch_in_flight_get_their_own_greedy_answer(client):
    """The longest request starts alone; at its third decode step (from inside the engine's
    own step hook, so no timing decides it) the others arrive and join the batch in flight."""
    calls = [Collect(p, max_tokens=10 + 4 * i, temperature=0.0) for i, p in enumerate(PROMPTS)]
    first, rest = calls[3], calls[:3] + calls[4:]
    steps = []

    def on_step(rows):
        steps.append(rows)
        if len(steps) == 3:
            for c in rest:
                engine.submit(c.request)

    engine = BatchingEngine(loaded(client), on_step=on_step)
    engine.submit(first.request)
    engine.start()
    try:
        for c in calls:
            assert c.done.wait(60), c.events[-3:]
    finally:
        engine.stop()
    for i, (p, c) in enumerate(zip(PROMPTS, calls)):
        assert c.texts[0] == alone(client, p, 10 + 4 * i)
        assert c.events[0] == ("admitted", "tiny:1", len(p))
    assert steps[:4] == [1, 1, 1, 5], steps  # they joined the one in flight
    assert steps[-1] == 1 and len(steps) == 3 + 26, steps  # and left as they finished: the last (26 tokens) joined at step 4


def test_a_seed_draws_the_same_text_whatever_shares_the_batch(client):
    engine = BatchingEngine(loaded(client)).start()
    try:
        (first,) = run(engine, [Collect(PROMPTS[0], n=3, max_tokens=12, seed=7)])
        crowd = run(engine, [Collect(p, n=2, max_tokens=12, seed=i) for i, p in enumerate(PROMPTS)] +
                    [Collect(PROMPTS[0], n=3, max_tokens=12, seed=7)])
        (other,) = run(engine, [Collect(PROMPTS[0], n=3, max_tokens=12, seed=8)])
    finally:
        engine.stop()
    assert crowd[-1].texts == first.texts
    assert len(set(first.texts)) > 1  # the choices of one request differ from each other
    assert other.texts != first.texts


def test_a_stop_string_ends_the_answer_and_is_never_sent(client):
    engine = BatchingEngine(loaded(client)).start()
    try:
        (free,) = run(engine, [Collect(PROMPTS[1], max_tokens=20, temperature=0.0)])
        stop = free.texts[0][9:13]  # a piece of what the model says unprompted
        (stopped,) = run(engine, [Collect(PROMPTS[1], max_tokens=20, temperature=0.0, stop=[stop])])
    finally:
        engine.stop()
    assert stopped.finish == ["stop"]
    assert stopped.texts[0] == free.texts[0][:free.texts[0].find(stop)]
    assert stop not in "".join(e[2] for e in stopped.events if e[0] == "text")
    assert free.finish == ["length"]


@pytest.mark.parametrize("text, stops, end", [("abc", ["xyz"], 3), ("abcx", ["xyz"], 3), ("abcxy", ["xyz"], 3),
                                              ("abcxy", ["yq", "xyz"], 3), ("ab\ufffd", [], 2), ("abc", [], 3)])
def test_text_that_could_become_a_stop_string_is_held_back(text, stops, end):
    assert _safe_end(text, stops) == end


def test_a_prompt_longer_than_the_context_is_refused_and_the_engine_keeps_serving(client):
    engine = BatchingEngine(loaded(client)).start()
    try:
        too_long, ok = run(engine, [Collect([5] * 250, max_tokens=10), Collect(PROMPTS[0], max_tokens=4, temperature=0.0)])
    finally:
        engine.stop()
    assert too_long.events[0][:2] == ("error", 400) and "context length of 256" in too_long.events[0][2]
    assert too_long.events[0][3] == "context_length_exceeded"
    assert ok.finish == ["length"]


def test_a_swap_finishes_the_rows_in_flight_on_the_old_model(client, tiny):
    other = LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    engine = BatchingEngine(loaded(client, "tiny:1")).start()
    try:
        early = Collect(PROMPTS[3], max_tokens=200, temperature=0.0)
        engine.submit(early.request)
        time.sleep(0.05)
        engine.swap(loaded(other, "tiny:2"))
        (late,) = run(engine, [Collect(PROMPTS[3], max_tokens=40, temperature=0.0)])
        assert early.done.wait(60)
    finally:
        engine.stop()
    assert early.events[0][1] == "tiny:1" and late.events[0][1] == "tiny:2"
    assert early.finish == ["length"] and early.texts[0] == alone(client, PROMPTS[3], 200)
    assert late.texts[0] == alone(other, PROMPTS[3], 40) != early.texts[0]


def test_a_prompt_the_template_refuses_is_a_400_and_the_engine_keeps_serving(client):
    from jinja2 import TemplateError

    def refuse(_tok):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    engine = BatchingEngine(loaded(client)).start()
    try:
        refused, ok = Collect(PROMPTS[0]), Collect(PROMPTS[0], max_tokens=4, temperature=0.0)
        refused.request.render = refuse
        run(engine, [refused, ok])
        assert engine.alive
    finally:
        engine.stop()
    assert refused.events == [("error", 400, "cannot render the prompt: TemplateError: Conversation roles must alternate "
                                             "user/assistant/user/assistant/...", None)]
    assert ok.finish == ["length"]


def test_a_cancelled_request_leaves_at_the_next_step_and_a_queued_one_never_starts(client):
    steps = []
    engine = BatchingEngine(loaded(client), on_step=steps.append)
    running, queued, after = Collect(PROMPTS[3], max_tokens=200), Collect(PROMPTS[0], max_tokens=5), Collect(PROMPTS[1], max_tokens=3)
    queued.request.cancelled = True
    running.request.sink = lambda ev: (running.sink(ev), ev[0] == "text" and setattr(running.request, "cancelled", True))
    for c in (running, queued, after):
        engine.submit(c.request)
    engine.start()
    try:
        assert after.done.wait(60)
        time.sleep(0.2)
        assert engine.rows == []
    finally:
        engine.stop()
    assert [e[0] for e in running.events][:2] == ["admitted", "text"] and "done" not in [e[0] for e in running.events]
    assert queued.events == [] and after.finish == ["length"]
    assert len(steps) < 20  # the 200-token request stopped within a step of its cancel


def test_a_request_for_an_exact_version_is_refused_once_another_serves(client, tiny):
    engine = BatchingEngine(loaded(client, "tiny:1")).start()
    try:
        (same,) = run(engine, [Collect(PROMPTS[0], max_tokens=3, version="tiny:1")])
        engine.swap(loaded(client, "tiny:2"))
        (old,) = run(engine, [Collect(PROMPTS[0], max_tokens=3, version="tiny:1")])
    finally:
        engine.stop()
    assert same.finish == ["length"]
    assert old.events == [("error", 404, "tiny:1 is no longer served here: tiny:2 is", "model_not_found")]


def test_a_stopped_engine_fails_what_it_holds_instead_of_leaving_callers_waiting(client):
    engine = BatchingEngine(loaded(client))
    waiting = Collect(PROMPTS[0], max_tokens=3)
    engine.submit(waiting.request)
    engine._stopping.set()  # stops before it ever admits
    engine.start()
    assert waiting.done.wait(10)
    assert waiting.events == [("error", 503, "the server is shutting down", None)]

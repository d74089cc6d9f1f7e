"""Calls to a hosted model as a pipeline needs them. Cached by content (provider, model and
the full request, never the key or the URL), so a re-run makes no call and a run reproduces
from its cache; at most `max_concurrency` in flight and `requests_per_minute` started;
retried with exponential backoff (a 429's Retry-After wins) on 429, 5xx, transport errors and
malformed answers; each call bounded by `deadline_s` over all its attempts. Hedged (Dean and
Barroso, "The Tail at Scale", 2013): when an attempt has not answered by the `hedge_percentile`
of the latencies measured so far, a second copy is sent, the first answer is kept and the other
copy cancelled; hedges stay under `hedge_budget` of the calls. Usage and cost are counted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import deque
from pathlib import Path

from dagster import Config
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from resources.api_models.providers import (Answer, MalformedAnswer, Provider, ProviderError, close_client, complete,
                                            make_client)
from resources.store.artifact_store import atomic_write_text


class CallSettings(Config):
    max_concurrency: PositiveInt = Field(default=8, description="calls in flight at once")
    requests_per_minute: NonNegativeFloat = Field(default=0, description="most attempts started per minute; 0: no limit")
    retries: NonNegativeInt = Field(default=4, description="retries of a 429, 5xx, transport error or malformed answer")
    backoff_s: PositiveFloat = Field(default=1.0, description="first retry's wait; doubled each time, jittered")
    max_backoff_s: PositiveFloat = 30.0
    timeout_s: PositiveFloat = Field(default=60.0, description="one attempt's HTTP timeout")
    deadline_s: PositiveFloat = Field(default=300.0, description="a call's limit over all its attempts and waits")
    hedge: bool = Field(default=True, description="send a second copy of an attempt slower than the measured percentile")
    hedge_percentile: float = Field(default=0.95, gt=0.0, lt=1.0)
    hedge_min_samples: PositiveInt = Field(default=20, description="latencies measured before the percentile is trusted")
    hedge_initial_s: PositiveFloat = Field(default=10.0, description="hedge delay until then")
    hedge_budget: float = Field(default=0.1, ge=0.0, le=1.0, description="most hedged calls, as a fraction of calls made")
    usd_per_million_input: NonNegativeFloat = 0.0
    usd_per_million_output: NonNegativeFloat = 0.0


class CallFailed(RuntimeError):
    pass


def cache_key(provider: str, model: str, request: dict) -> str:
    return hashlib.sha256(json.dumps({"provider": provider, "model": model, "request": request}, sort_keys=True).encode()).hexdigest()


class ApiModelClient:
    def __init__(self, provider: Provider, model: str, key: str, base_url: str | None, settings: CallSettings, cache_dir: Path):
        self.provider, self.model, self.key, self.base_url, self.settings = provider, model, key, base_url, settings
        self.cache_dir = cache_dir
        self.usage = {"calls": 0, "attempts": 0, "cache_hits": 0, "retries": 0, "hedged": 0, "input_tokens": 0, "output_tokens": 0}
        self.latencies: deque[float] = deque(maxlen=1000)  # of single attempts: what the hedge delay is a percentile of
        self.call_seconds: list[float] = []  # of whole calls (retries, waits and hedges included)
        self._next_start = 0.0
        self._rng = random.Random(0)

    # -- the cache ------------------------------------------------------------------------

    def _cached(self, key: str) -> Answer | None:
        path = self.cache_dir / key[:2] / f"{key}.json"
        if not path.exists():
            return None
        return Answer(**json.loads(path.read_text())["answer"])

    def _store(self, key: str, request: dict, answer: Answer) -> None:
        record = {"provider": self.provider, "model": self.model, "request": request, "answer": answer.__dict__}
        atomic_write_text(self.cache_dir / key[:2] / f"{key}.json", json.dumps(record, sort_keys=True))

    # -- one attempt, hedged ----------------------------------------------------------------

    async def _throttle(self) -> None:
        if not self.settings.requests_per_minute:
            return
        now = time.monotonic()
        start, self._next_start = max(now, self._next_start), max(now, self._next_start) + 60.0 / self.settings.requests_per_minute
        await asyncio.sleep(start - now)

    async def _attempt(self, client, request: dict) -> Answer:
        await self._throttle()
        self.usage["attempts"] += 1
        t0 = time.monotonic()
        answer = await complete(self.provider, client, self.model, request["messages"], request["max_tokens"],
                                request["temperature"])
        self.latencies.append(time.monotonic() - t0)
        return answer

    def hedge_delay(self) -> float | None:
        s = self.settings
        if not s.hedge or self.usage["hedged"] >= s.hedge_budget * max(1, self.usage["calls"]):
            return None
        if len(self.latencies) < s.hedge_min_samples:
            return s.hedge_initial_s
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(s.hedge_percentile * len(ordered)))]

    async def _hedged(self, client, request: dict) -> Answer:
        first = asyncio.create_task(self._attempt(client, request))
        delay = self.hedge_delay()
        done, _ = await asyncio.wait({first}, timeout=delay)
        if done or self.hedge_delay() is None:  # answered in time, or the budget went meanwhile
            return await first
        self.usage["hedged"] += 1
        pending = {first, asyncio.create_task(self._attempt(client, request))}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        return task.result()
            raise next(iter(done)).exception()  # both copies failed: the last error
        finally:
            for task in pending:  # the slower copy: cancelled, its connection closed
                task.cancel()

    # -- a call: retries within the deadline --------------------------------------------------

    async def _call(self, client, request: dict) -> Answer:
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                return await self._hedged(client, request)
            except (ProviderError, MalformedAnswer) as e:
                if attempt == s.retries or (isinstance(e, ProviderError) and not e.retryable):
                    raise CallFailed(f"{self.provider} {self.model}: {e} (after {attempt + 1} attempts)") from e
                wait = getattr(e, "retry_after", None) or min(s.max_backoff_s, s.backoff_s * 2 ** attempt) * (0.5 + self._rng.random())
                self.usage["retries"] += 1
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _run(self, requests: list[dict]) -> list[Answer]:
        client = make_client(self.provider, self.key, self.base_url, self.settings.timeout_s)
        slots = asyncio.Semaphore(self.settings.max_concurrency)

        async def one(request: dict) -> Answer:
            key = cache_key(self.provider, self.model, request)
            if (hit := self._cached(key)) is not None:
                self.usage["cache_hits"] += 1
                return hit
            async with slots:
                self.usage["calls"] += 1
                t0 = time.monotonic()
                try:
                    answer = await asyncio.wait_for(self._call(client, request), self.settings.deadline_s)
                except TimeoutError:
                    raise CallFailed(f"{self.provider} {self.model}: no answer within the {self.settings.deadline_s} s "
                                     "deadline") from None
                self.call_seconds.append(time.monotonic() - t0)
            self.usage["input_tokens"] += answer.input_tokens
            self.usage["output_tokens"] += answer.output_tokens
            self._store(key, request, answer)
            return answer

        try:
            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            await close_client(self.provider, client)

    def complete(self, requests: list[dict]) -> list[Answer]:
        """Each request ({"messages", "max_tokens", "temperature"}, plus anything that should
        make two otherwise equal calls distinct, such as a sample index) answered in order."""
        return asyncio.run(self._run([{"max_tokens": 256, "temperature": 0.0, **r} for r in requests]))

    def report(self) -> dict:
        s = self.settings
        cost = (self.usage["input_tokens"] * s.usd_per_million_input + self.usage["output_tokens"] * s.usd_per_million_output) / 1e6
        seconds = sorted(self.call_seconds)
        quantiles = {f"p{q}_s": round(seconds[min(len(seconds) - 1, int(q / 100 * len(seconds)))], 4) for q in (50, 99)} if seconds else {}
        return {"provider": self.provider, "model": self.model, **self.usage, "cost_usd": round(cost, 6), **quantiles}

"""`crucible serve`'s HTTP side: the OpenAI API (chat completions, completions, models),
feedback on a response by id, /health and Prometheus /metrics, on FastAPI. Every answer
carries the exact registry version that produced it: `model_version` in the body,
`system_fingerprint` (OpenAI's field for "which backend configuration answered") and the
`X-Crucible-Model-Version` header."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from crucible_jobs.serving.engine import BatchingEngine, Request
from crucible_jobs.serving.protocol import (ChatCompletionRequest, CompletionRequest, FeedbackRequest, OpenAIError, Sampling,
                                            parse)
from crucible_jobs.serving.responses import ResponseLog, UnknownResponse, append_feedback
from crucible_jobs.serving.served_model import AliasFollower, model_spec
from resources.datasets.sources import DatasetError

VERSION_HEADER = "X-Crucible-Model-Version"


@dataclass
class Served:
    """What one server runs: `name` is the registered model, `spec` what it follows."""

    name: str
    spec: str
    engine: BatchingEngine
    responses: ResponseLog
    follower: AliasFollower | None = None
    api_key: str | None = None  # from $CRUCIBLE_SERVE_API_KEY; never logged
    max_body_bytes: int = 1 << 20


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("crucible_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("crucible_serve_tokens", "prompt and completion tokens", ["kind"], registry=self.registry)
        self.latency = Histogram("crucible_serve_request_seconds", "completion latency, to the last token", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=self.registry)
        self.batch_rows = Histogram("crucible_serve_batch_rows", "rows (choices) in each decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.swaps = Counter("crucible_serve_model_swaps", "times the followed alias moved to a new version",
                             registry=self.registry)


class Call:
    """One request's events, carried from the engine thread into this request's coroutine."""

    def __init__(self, request_kwargs: dict, render):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.request = Request(render=render, sink=lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev),
                               **request_kwargs)

    async def admitted(self) -> tuple[str, int]:
        event = await self.events.get()
        if event[0] == "error":
            raise OpenAIError(event[1], event[2], code=event[3], kind="invalid_request_error" if event[1] == 400 else "server_error")
        return event[1], event[2]


def create_app(served: Served) -> FastAPI:
    metrics = Metrics()
    served.engine.on_step = metrics.batch_rows.observe

    @asynccontextmanager
    async def lifespan(_app):
        served.engine.start()
        if served.follower:
            served.follower.on_swap = lambda: metrics.swaps.inc()
            served.follower.start()
        yield
        if served.follower:
            served.follower.stop()
        served.engine.stop()
        served.responses.close()

    app = FastAPI(title=f"crucible serve {served.spec}", lifespan=lifespan, docs_url=None, redoc_url=None)
    routes: set[str] = set()  # filled once the routes below exist, not per request

    @app.exception_handler(OpenAIError)
    async def _openai_error(_req, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e: StarletteHTTPException):
        return JSONResponse(OpenAIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.middleware("http")
    async def _count(request: HttpRequest, call_next):
        endpoint = request.url.path if request.url.path in routes else "other"  # a scanner's paths are not label values
        if served.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                response = JSONResponse(OpenAIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                                    code="invalid_api_key").body(), status_code=401)
                metrics.requests.labels(endpoint, "401").inc()
                return response
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def body_of(request: HttpRequest, model):
        if int(request.headers.get("content-length") or 0) > served.max_body_bytes:
            raise OpenAIError(413, f"the body is larger than {served.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > served.max_body_bytes:
                raise OpenAIError(413, f"the body is larger than {served.max_body_bytes} bytes")
        return parse(model, bytes(body))

    def check_model(asked: str) -> str | None:
        """The exact version asked for (a request for `chat_sl:3` must not be answered by v4), or None."""
        if asked not in {served.name, served.spec, model_spec(served.spec), served.engine.version}:
            raise OpenAIError(404, f"the model {asked!r} is not served here; this server serves {model_spec(served.spec)} "
                                   f"(now {served.engine.version}): ask for {served.name!r}", param="model",
                              code="model_not_found")
        return asked if asked == served.engine.version else None

    def sampling(req: Sampling, max_tokens: int | None) -> dict:
        return {"n": req.n, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "stop": req.stop or [], "seed": req.seed, "version": check_model(req.model)}  # 404 for a model not served

    async def complete(http: HttpRequest, endpoint: str, req: Sampling, call: Call, prompt, chunk, whole):
        """Runs one call; `chunk(choice, text, finish)` shapes a stream event, `whole(texts,
        finishes, usage)` the final body."""
        started = time.perf_counter()
        version, prompt_tokens = await call.admitted()
        rid, created = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": served.name, "model_version": version, "system_fingerprint": version}
        metrics.tokens.labels("prompt").inc(prompt_tokens)
        texts, finishes, used = [""] * req.n, [None] * req.n, 0

        async def events():
            nonlocal used
            while None in finishes:
                event = await call.events.get()
                if event[0] == "error":
                    raise OpenAIError(event[1], event[2], kind="server_error")
                if event[0] == "text":
                    texts[event[1]] += event[2]
                else:
                    finishes[event[1]] = event[2]
                    used += event[3]
                yield event

        def finish():
            metrics.tokens.labels("completion").inc(used)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            served.responses.add(rid, version, prompt, texts)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}

        if not req.stream:
            watcher = asyncio.create_task(cancel_when_gone(http, call))  # Starlette does not cancel this handler
            try:
                async for _ in events():
                    pass
            finally:
                watcher.cancel()
                call.request.cancelled = True
            return JSONResponse({**head, **whole(texts, finishes, finish())}, headers={VERSION_HEADER: version})

        async def sse():
            try:
                for i in range(req.n):
                    yield _sse({**head, **chunk(i, "", None, first=True)})
                async for event in events():
                    text, done = (event[2], None) if event[0] == "text" else ("", event[2])
                    yield _sse({**head, **chunk(event[1], text, done)})
                usage = finish()
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**head, "object": chunk(0, "", None)["object"], "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
            except OpenAIError as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
                yield _sse(e.body())
            finally:
                call.request.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream", headers={VERSION_HEADER: version})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        req = await body_of(request, ChatCompletionRequest)
        messages = [m.model_dump() for m in req.messages]
        call = Call(sampling(req, req.max_completion_tokens or req.max_tokens),
                    lambda tok: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        served.engine.submit(call.request)

        def chunk(i, text, done, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"object": "chat.completion.chunk", "choices": [{"index": i, "delta": delta, "finish_reason": done, "logprobs": None}]}

        def whole(texts, finishes, usage):
            return {"object": "chat.completion", "usage": usage,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
                                for i, (t, f) in enumerate(zip(texts, finishes))]}

        return await complete(request, "chat", req, call, messages, chunk, whole)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        req = await body_of(request, CompletionRequest)
        call = Call(sampling(req, req.max_tokens), lambda tok: tok(req.prompt)["input_ids"])
        served.engine.submit(call.request)

        def chunk(i, text, done, first=False):
            return {"object": "text_completion", "choices": [{"index": i, "text": text, "finish_reason": done, "logprobs": None}]}

        def whole(texts, finishes, usage):
            return {"object": "text_completion", "usage": usage,
                    "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                                for i, (t, f) in enumerate(zip(texts, finishes))]}

        return await complete(request, "completions", req, call, req.prompt, chunk, whole)

    @app.post("/v1/feedback")
    async def feedback(request: HttpRequest):
        req = await body_of(request, FeedbackRequest)
        try:
            answered = served.responses.get(req.response_id, req.choice)
        except UnknownResponse as e:
            raise OpenAIError(404, e.args[0], param="response_id", code="response_not_found") from None
        record = {**answered, "rating": req.rating, "edited_response": req.edited_response}
        try:
            path = await asyncio.to_thread(append_feedback, record)
        except DatasetError as e:
            raise OpenAIError(400, str(e)) from None
        return {"object": "feedback", "response_id": req.response_id, "choice": req.choice,
                "model_version": answered["model_version"], "file": path.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "crucible",
                                            "follows": model_spec(served.spec), "model_version": served.engine.version}]}

    @app.get("/health")
    async def health():
        """503 once the decode loop is gone, so a liveness probe restarts the server."""
        body = {"status": "ok" if served.engine.alive else "engine stopped", "model": served.name,
                "follows": model_spec(served.spec), "model_version": served.engine.version, "active_rows": len(served.engine.rows)}
        return JSONResponse(body, status_code=200 if served.engine.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes.update(r.path for r in app.routes)
    return app


async def cancel_when_gone(http: HttpRequest, call: Call, every: float = 0.25) -> None:
    """A client that hung up frees its rows at the next decode step."""
    while not await http.is_disconnected():
        await asyncio.sleep(every)
    call.request.cancelled = True


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"

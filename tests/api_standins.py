"""Local stand-ins for the hosted-model APIs, one app speaking three wire formats: OpenAI's
chat completions, Anthropic's messages and Google's generateContent (as the Tinker adapter's
contract suite stands in for Tinker). Each call takes the next action of `plan` (then
`default`): "ok", ("status", code, retry_after or None), ("stall", seconds), "malformed". Calls
are counted per provider; `answer(provider, messages)` writes the reply; `latency(body)` adds a
delay to every "ok" (a heavy tail for the hedging test). Keys are checked where each provider
sends them."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter, deque

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from local_services import free_port

KEY = "test-key-not-secret"


class StandIn:
    def __init__(self):
        self.calls: Counter = Counter()
        self.plan: deque = deque()
        self.default = "ok"
        self.answer = lambda provider, messages: f"echo: {messages[-1]['content']}"
        self.latency = lambda body: 0.0  # seconds to wait before answering this request body
        self.bodies: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def next_action(self):
        with self._lock:
            return self.plan.popleft() if self.plan else self.default

    async def _serve(self, provider: str, request: Request, messages_of, body_of, error_of):
        authorized = {"openai": request.headers.get("authorization") == f"Bearer {KEY}",
                      # x-api-key (anthropic<2) or a bearer token (anthropic>=2), always with anthropic-version
                      "anthropic": KEY in (request.headers.get("x-api-key"), request.headers.get("authorization", "")[7:])
                                   and "anthropic-version" in request.headers,
                      "google": request.headers.get("x-goog-api-key") == KEY}[provider]
        if not authorized:
            return JSONResponse(error_of(401, "bad key"), status_code=401)
        body = await request.json()
        self.calls[provider] += 1
        self.bodies.append((provider, body))
        action = self.next_action()
        if isinstance(action, tuple) and action[0] == "stall":
            await asyncio.sleep(action[1])
            action = "ok"
        if isinstance(action, tuple) and action[0] == "status":
            headers = {"retry-after": str(action[2])} if action[2] is not None else {}
            return JSONResponse(error_of(action[1], "stand-in error"), status_code=action[1], headers=headers)
        if action == "malformed":
            return JSONResponse({"unexpected": "shape"})
        await asyncio.sleep(self.latency(body))
        text = self.answer(provider, messages_of(body))
        return JSONResponse(body_of(body, text, 11, len(text.split())))

    async def openai(self, request: Request):
        return await self._serve("openai", request, lambda b: b["messages"], lambda b, text, n, m: {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": b["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}},
            lambda code, msg: {"error": {"message": msg, "type": "server_error" if code >= 500 else "invalid_request_error",
                                         "code": None}})

    async def anthropic(self, request: Request):
        def messages(b):
            return ([{"role": "system", "content": b["system"]}] if b.get("system") else []) + b["messages"]
        return await self._serve("anthropic", request, messages, lambda b, text, n, m: {
            "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": b["model"],
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": n, "output_tokens": m}},
            lambda code, msg: {"type": "error", "error": {"type": "rate_limit_error" if code == 429 else "api_error", "message": msg}})

    async def google(self, request: Request):
        if not request.path_params["rest"].endswith(":generateContent"):
            return JSONResponse({"error": {"code": 404, "message": "no such method", "status": "NOT_FOUND"}}, status_code=404)

        def messages(b):
            system = b.get("systemInstruction") or b.get("system_instruction")
            turns = [{"role": "assistant" if c.get("role") == "model" else "user", "content": c["parts"][0]["text"]}
                     for c in b["contents"]]
            return ([{"role": "system", "content": system["parts"][0]["text"]}] if system else []) + turns
        return await self._serve("google", request, messages, lambda b, text, n, m: {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": n, "candidatesTokenCount": m, "totalTokenCount": n + m}},
            lambda code, msg: {"error": {"code": code, "message": msg, "status": "RESOURCE_EXHAUSTED" if code == 429 else "INTERNAL"}})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.openai, methods=["POST"]),
                                 Route("/v1/messages", self.anthropic, methods=["POST"]),
                                 Route("/v1beta/models/{rest:path}", self.google, methods=["POST"]),
                                 Route("/v1/models/{rest:path}", self.google, methods=["POST"])])  # google-genai>=3: v1


def serve(stand_in: StandIn):
    """Runs the stand-in on a free local port; returns (base URL, stop)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stand_in.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
    return f"http://127.0.0.1:{port}", stop


BASE_URLS = {"openai": "{base}/v1", "anthropic": "{base}", "google": "{base}"}

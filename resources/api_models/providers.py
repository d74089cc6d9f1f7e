"""One chat call to a hosted model through its provider's official SDK (`openai`,
`anthropic`, `google-genai`), or any OpenAI-compatible base URL (`crucible serve`, vLLM).
Keys come from the environment only (KEY_VARIABLES) and are handed to the SDK client, never
written anywhere. Every SDK's own retries are off: calls.py retries, hedges and caches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Provider = Literal["openai", "anthropic", "google"]
KEY_VARIABLES: dict[str, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "google": "GEMINI_API_KEY"}


@dataclass(frozen=True)
class Answer:
    text: str
    input_tokens: int
    output_tokens: int


class MalformedAnswer(RuntimeError):
    """The provider answered 200 with a body that holds no text: retried like a 5xx."""


class ProviderError(RuntimeError):
    """An HTTP error from a provider: `status` (None for a transport failure) and, on a 429
    or 503, the `retry_after` seconds it asked for."""

    def __init__(self, message: str, status: int | None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


def make_client(provider: Provider, key: str, base_url: str | None, timeout: float):
    if provider == "openai":
        import openai

        return openai.AsyncOpenAI(api_key=key, base_url=base_url or None, max_retries=0, timeout=timeout)
    if provider == "anthropic":
        import anthropic

        return anthropic.AsyncAnthropic(api_key=key, base_url=base_url or None, max_retries=0, timeout=timeout)
    from google import genai
    from google.genai import types

    options = types.HttpOptions(base_url=base_url or None, timeout=int(timeout * 1000),
                                retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=key, http_options=options)


async def close_client(provider: Provider, client) -> None:
    """Inside the event loop that used it: a client collected after its loop closed errors."""
    await (client.aio.aclose() if provider == "google" else client.close())


def _takes(method, name: str) -> bool:
    import inspect

    return name in inspect.signature(method).parameters


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    return system, [m for m in messages if m["role"] != "system"]


async def complete(provider: Provider, client, model: str, messages: list[dict], max_tokens: int, temperature: float) -> Answer:
    """One call; the SDK's errors become ProviderError / MalformedAnswer."""
    try:
        if provider == "openai":
            r = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature)
            text = r.choices[0].message.content if r.choices else None
            usage = (r.usage.prompt_tokens, r.usage.completion_tokens) if r.usage else (0, 0)
        elif provider == "anthropic":
            system, rest = _split_system(messages)
            # SDKs for models without sampling controls (anthropic>=2) no longer take `temperature`
            sampling = {"temperature": temperature} if _takes(client.messages.create, "temperature") else {}
            r = await client.messages.create(model=model, messages=rest, max_tokens=max_tokens, **sampling,
                                             **({"system": system} if system else {}))
            text = "".join(b.text for b in r.content if getattr(b, "type", None) == "text") if r.content else None
            usage = (r.usage.input_tokens, r.usage.output_tokens)
        else:
            from google.genai import types

            system, rest = _split_system(messages)
            contents = [types.Content(role="model" if m["role"] == "assistant" else "user", parts=[types.Part(text=m["content"])])
                        for m in rest]
            r = await client.aio.models.generate_content(model=model, contents=contents, config=types.GenerateContentConfig(
                max_output_tokens=max_tokens, temperature=temperature, system_instruction=system))
            text = r.text
            meta = r.usage_metadata
            usage = (meta.prompt_token_count or 0, meta.candidates_token_count or 0) if meta else (0, 0)
    except Exception as e:  # noqa: BLE001 - each SDK has its own error classes; sort them by HTTP status
        raise as_provider_error(e) from e
    if not isinstance(text, str) or not text.strip():
        raise MalformedAnswer(f"{provider} {model}: the answer holds no text")
    return Answer(text, int(usage[0]), int(usage[1]))


def as_provider_error(e: Exception) -> Exception:
    if isinstance(e, (MalformedAnswer, ProviderError)):
        return e
    status = getattr(e, "status_code", None) or getattr(e, "code", None)
    response = getattr(e, "response", None)
    headers = getattr(response, "headers", None) or {}
    retry_after = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        retry_after = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after = None
    if isinstance(status, int):
        return ProviderError(f"HTTP {status}: {str(e)[:300]}", status, retry_after)
    if type(e).__name__ in ("ValidationError", "ValueError", "KeyError", "TypeError", "JSONDecodeError"):
        return MalformedAnswer(f"the answer could not be read: {type(e).__name__}: {str(e)[:300]}")
    return ProviderError(f"{type(e).__name__}: {str(e)[:300]}", None)

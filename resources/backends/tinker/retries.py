"""Retries for a remote training service: exponential backoff on transient failures, no
retry on auth failures, and one deadline per call so that nothing (sampling included) waits
longer than the caller allows, however the service misbehaves.

The service's SDK hands back futures; `resolve` re-submits the request after a transient
failure. That re-submission is safe for the operations we call because a failed future
means the service did not apply the request (Tinker sequences a client's requests and
fails them whole).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


class Failure(Enum):
    TRANSIENT = "transient"  # connection errors, time-outs, 429, 5xx: worth another try
    AUTH = "auth"  # bad or missing credentials: retrying cannot help
    FATAL = "fatal"  # anything else: a bug or bad input, surfaced as is


class BackendAuthError(RuntimeError):
    """The service refused our credentials."""


class BackendUnavailableError(RuntimeError):
    """Transient failures outlasted the retry budget."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    deadline_s: float = 900.0  # per call, retries and waiting included

    def delay(self, attempt: int) -> float:
        """Backoff before attempt `attempt + 1` (attempt counts from 1)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))


def resolve_all(
    submits: Sequence[Callable[[], Any]],
    what: str,
    policy: RetryPolicy,
    classify: Callable[[BaseException], Failure],
    auth_hint: str = "",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[Any]:
    """Submit every request at once (the service works on them concurrently), then wait
    for each, re-submitting one that failed transiently. A submit returns a future (with
    `.result(timeout)`) or a plain value. All of them share one deadline."""
    deadline = clock() + policy.deadline_s
    pending: list[Any] = [_submit(s, classify) for s in submits]
    return [_wait(s, first, what, policy, classify, auth_hint, sleep, clock, deadline) for s, first in zip(submits, pending)]


def resolve(submit: Callable[[], Any], what: str, policy: RetryPolicy, classify: Callable[[BaseException], Failure],
            auth_hint: str = "", sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> Any:
    return resolve_all([submit], what, policy, classify, auth_hint, sleep, clock)[0]


class _Failed:
    """A submit that raised: waiting on it re-raises, so one code path handles both."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self, timeout: float | None = None) -> Any:
        raise self.error


def _submit(submit: Callable[[], Any], classify: Callable[[BaseException], Failure]) -> Any:
    try:
        return submit()
    except Exception as e:  # noqa: BLE001 - classified when waited on
        if classify(e) is Failure.FATAL:
            raise
        return _Failed(e)


def _wait(submit, pending, what, policy, classify, auth_hint, sleep, clock, deadline) -> Any:
    attempt = 1
    while True:
        try:
            remaining = max(deadline - clock(), 0.0)
            return pending.result(timeout=remaining) if hasattr(pending, "result") else pending
        except Exception as e:  # noqa: BLE001 - classified below
            kind = classify(e)
            if kind is Failure.AUTH:
                raise BackendAuthError(f"{what}: the service rejected the credentials ({type(e).__name__}); "
                                       f"{auth_hint}".rstrip("; ")) from e
            if kind is Failure.FATAL:
                raise
            wait = policy.delay(attempt)
            if attempt >= policy.max_attempts or clock() + wait >= deadline:
                spent = policy.deadline_s - max(deadline - clock(), 0.0)
                raise BackendUnavailableError(
                    f"{what}: gave up after {attempt} attempt(s) in {spent:.1f}s "
                    f"(max_attempts {policy.max_attempts}, deadline {policy.deadline_s:.0f}s); "
                    f"last error: {type(e).__name__}: {e}") from e
            sleep(wait)
            attempt += 1
            pending = _submit(submit, classify)

"""The retry policy, assembled from tenacity's named parts in one place.

Only `RetryableError` is retried. The wait honours the server's Retry-After on a 429 and
otherwise backs off exponentially with jitter. Callers use the iterator form so that every
attempt goes through the limiter again:

    async for attempt in policy:
        with attempt:
            ...
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from batchrun.errors import RateLimited, RetryableError
from batchrun.job import Limits

#: never sleep longer than this for one Retry-After, whatever the server says
MAX_SERVER_DELAY = 900.0


class wait_retry_after(wait_base):
    """Wait what a 429's Retry-After asks for; fall back to another wait otherwise."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return min(error.retry_after, MAX_SERVER_DELAY)
        return float(self.fallback(retry_state))


def build_policy(
    limits: Limits,
    *,
    before_sleep: Callable[[RetryCallState], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> AsyncRetrying:
    """The policy for one worker; reuse it row after row, never share it between tasks."""
    return AsyncRetrying(
        stop=stop_after_attempt(limits.max_attempts),
        wait=wait_retry_after(
            wait_exponential_jitter(
                multiplier=limits.initial_backoff,
                max=limits.max_backoff,
                jitter=limits.initial_backoff,
            )
        ),
        retry=retry_if_exception_type(RetryableError),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )

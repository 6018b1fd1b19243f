"""The retry policy, assembled from tenacity's named parts in one place.

Only `RetryableError` is retried. The wait honours the server's Retry-After on a 429 and
otherwise backs off exponentially with jitter. (A 429 reaches the policy only when the server
has answered nothing else for a long while: until then `rows` sends it again within the same
attempt, after the limiter's wait.) `RetryPolicy.retry` takes over after a first attempt
the caller made itself, running a whole attempt function each time, so every attempt goes
through the limiter again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio

from batchrun.errors import RateLimited, RetryableError
from batchrun.job import Limits

if TYPE_CHECKING:  # tenacity loads with a run's first retry (`RetryPolicy.retry`)
    from tenacity import AsyncRetrying, RetryCallState

T = TypeVar("T")

#: never sleep longer than this for one Retry-After, whatever the server says
MAX_SERVER_DELAY = 900.0


class wait_retry_after:
    """Wait what a 429's Retry-After asks for; fall back to another wait otherwise (a
    tenacity wait: any callable of the retry state)."""

    def __init__(self, fallback: Callable[[RetryCallState], float]) -> None:
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
    """The tenacity policy; reuse it call after call, never share it between tasks."""
    from tenacity import (
        AsyncRetrying,
        retry_if_exception_type,
        stop_after_attempt,
        wait_exponential_jitter,
    )

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


class RetryPolicy:
    """Runs an attempt function again until it succeeds, fails for good, or runs out of
    attempts, after a first attempt that failed.

    The caller makes the first attempt itself (`rows`): most requests succeed at once, and
    tenacity's per-call bookkeeping costs about a quarter of the runner's throughput at high
    request rates. After a retryable failure, tenacity takes over; the first failure is
    replayed as its attempt 1, so its stop, wait and before_sleep see the true attempt
    numbers. One policy per task. The tenacity policy is built at the first retry: a run
    whose every first send succeeds never imports tenacity (~5 ms of start-up, issue 12).
    """

    def __init__(
        self,
        limits: Limits,
        *,
        before_sleep: Callable[[RetryCallState], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.max_attempts = limits.max_attempts
        self._limits = limits
        self._before_sleep = before_sleep
        self._sleep = sleep
        self._retrying: AsyncRetrying | None = None

    async def retry(self, first: RetryableError, attempt: Callable[[], Awaitable[T]]) -> T:
        """Go on after a first attempt that failed with `first` (made by the caller, so that
        a first attempt that succeeds costs no call through here): `await attempt()` again
        after the policy's wait, until it succeeds or attempts run out (then the last error
        is raised)."""
        if self.max_attempts <= 1:
            raise first
        if self._retrying is None:
            self._retrying = build_policy(
                self._limits, before_sleep=self._before_sleep, sleep=self._sleep
            )
        async for trial in self._retrying:
            with trial:
                if trial.retry_state.attempt_number == 1:
                    raise first
                return await attempt()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

"""Metering one attempt: the rate limiter's lease, the spend cap's reservation and the price.

    request = meter.request(body)            # estimated and priced once per row
    async with meter.attempt(request) as a:  # waits for the budgets
        a.sending()
        a.received(await send(request.body))

On leaving the block the attempt is settled whatever happened, cancellation included (the
settling is shielded): the lease is settled with the outcome and the usage, or cancelled if
nothing was sent; the spend cap learns the real charge. This module owns which outcome an
error is for the limiter, and how an answer is charged.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import anyio

from batchrun import tokens
from batchrun.client import Completion
from batchrun.clock import SYSTEM_CLOCK, Clock
from batchrun.errors import LeaseExpired, RateLimited, RetryableError
from batchrun.limits import Outcome, SpendBudget
from batchrun.prices import Charge, PriceTable
from batchrun.ratelimit import Lease, RateLimiter, Scope
from batchrun.schedule import OffPeakSchedule


def outcome_of(error: BaseException | None, answer: Completion | None) -> Outcome:
    """How an attempt ended, as far as the limiter cares."""
    if answer is not None:
        return Outcome.OK
    if isinstance(error, RateLimited):
        return Outcome.RATE_LIMITED
    if isinstance(error, RetryableError) and error.error_class in ("server", "server_busy"):
        return Outcome.SERVER_ERROR
    return Outcome.OTHER


@dataclass(frozen=True, slots=True)
class MeteredRequest:
    """A request body with what its attempts reserve: estimated and priced once per row."""

    body: dict[str, Any]
    model: str
    scope: Scope
    prompt_tokens: int
    #: the prompt at most (every character a token), for the worst case
    prompt_at_most: int
    completion_cap: int
    #: USD the spend cap holds while an attempt is in flight
    worst_usd: float


class Attempt:
    """One attempt's metering; an async context manager made by `AttemptMeter.attempt`."""

    def __init__(self, meter: AttemptMeter, request: MeteredRequest) -> None:
        self._meter = meter
        self.request = request
        self.lease: Lease | None = None
        #: cancels the block at the lease's expiry
        self._deadline: anyio.CancelScope | None = None
        #: wall-clock time and `perf_counter()` when the request left (None: never sent)
        self.sent_at: datetime | None = None
        #: the wall-clock time the attempt got its budgets (and the schedule let it go)
        self._cleared_at: datetime | None = None
        self.started: float | None = None
        #: seconds the request took, once the block is left
        self.seconds = 0.0
        self.answer: Completion | None = None
        #: what the answer is counted as costing, once the block is left
        self.charge: Charge | None = None

    @property
    def sent(self) -> bool:
        return self.started is not None

    def sending(self) -> None:
        """Note that the request is leaving now: from here on, the lease is settled."""
        self.sent_at, self.started = (
            self._cleared_at or self._meter.clock.now(),
            time.perf_counter(),
        )

    def resent(self) -> None:
        """The request goes again after waiting for the endpoint to come back (an outage):
        it is priced at the hour it really leaves."""
        self._cleared_at = None
        self.sent_at = self._meter.clock.now()

    def received(self, answer: Completion) -> None:
        self.answer = answer

    async def __aenter__(self) -> Attempt:
        meter, request = self._meter, self.request
        schedule = meter.schedule
        while True:
            # off-peak runs: no budget is held while waiting; and a wait is no silence of the
            # server, so the 429s met on resuming are asked again as after any answer
            if schedule is not None and await schedule.wait_off_peak(request.model):
                meter.last_answer = max(meter.last_answer, anyio.current_time())
            await meter.spend.reserve(request.worst_usd)
            try:
                self.lease = await meter.limiter.reserve(
                    request.scope,
                    prompt_tokens=request.prompt_tokens,
                    completion_cap=request.completion_cap,
                )
            except BaseException:
                meter.spend.settle(request.worst_usd, None)
                raise
            # the caller sends with no wait between here and `sending()`: this is the moment
            # the request leaves, read once, so the schedule's check and the price agree
            self._cleared_at = meter.clock.now()
            if (
                schedule is None
                or schedule.stopping
                or not schedule.at_peak(request.model, self._cleared_at)
            ):
                break
            # peak began while the attempt waited for its budgets: give them back, wait again
            meter.spend.settle(request.worst_usd, None)
            with anyio.CancelScope(shield=True):
                await meter.limiter.cancel(self.lease)
            self.lease = None
        self._deadline = anyio.CancelScope(deadline=self.lease.expires_at)
        self._deadline.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        deadline = self._deadline
        if deadline is not None:
            deadline.__exit__(exc_type, exc, tb)
        if deadline is not None and deadline.cancelled_caught:
            expired = LeaseExpired()  # the block was cancelled at the lease's expiry
            await shielded(self._meter.settle(self, expired), at_once=self._meter.settles_at_once)
            raise expired from None
        await shielded(self._meter.settle(self, exc), at_once=self._meter.settles_at_once)


async def shielded(step: Coroutine[Any, Any, None], *, at_once: bool) -> None:
    """Await `step` shielded from cancellation; `at_once`: it is known never to suspend.

    A coroutine that finishes without suspending (the local limiter's settle) reaches no
    checkpoint, so no cancellation can reach it: it is run to its end at once, without a
    cancel scope (a shield costs about 1% of a request's CPU, issue 12). Any other is
    awaited inside a shielded scope.
    """
    if not at_once:
        with anyio.CancelScope(shield=True):
            await step
        return
    try:
        step.send(None)
    except StopIteration:
        return
    # a cancel scope cannot be put around a coroutine already under way
    step.close()
    raise RuntimeError("a limiter that says it settles at once suspended while settling")


class AttemptMeter:
    """Meters every attempt of a run against the rate limiter, the spend cap and the prices.

    Args:
        endpoint, key_digest: the scope's endpoint and account (`ratelimit.key_digest`).
        clock: the wall clock that says when a request was sent, so what it costs.
        schedule: with `schedule = "off-peak"`, holds each attempt back while its model is
            at peak price.
    """

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        spend: SpendBudget,
        prices: PriceTable,
        endpoint: str,
        key_digest: str = "",
        clock: Clock = SYSTEM_CLOCK,
        schedule: OffPeakSchedule | None = None,
    ) -> None:
        self.limiter = limiter
        self.clock = clock
        self.schedule = schedule
        self.spend = spend
        self.prices = prices
        self.endpoint = endpoint
        self.key_digest = key_digest
        self._scopes: dict[str, Scope] = {}
        #: the limiter's settle and cancel never suspend (`settle` then needs no shield)
        self.settles_at_once: bool = getattr(limiter, "settles_at_once", False)
        #: `anyio.current_time()` of the last answer of any attempt (at first: the start)
        self.last_answer = anyio.current_time()

    def request(self, body: dict[str, Any]) -> MeteredRequest:
        model = str(body.get("model"))
        prompt_tokens, prompt_at_most = tokens.prompt_estimate(body)  # one pass for both
        cap = tokens.completion_cap(body)
        worst = 0.0
        if self.spend.cap is not None:
            worst = self.prices.worst_case(
                model, self.clock.now(), prompt_tokens=prompt_at_most, completion_cap=cap
            )
        return MeteredRequest(
            body=body,
            model=model,
            scope=self._scope(model),
            prompt_tokens=prompt_tokens,
            prompt_at_most=prompt_at_most,
            completion_cap=cap,
            worst_usd=worst,
        )

    def _scope(self, model: str) -> Scope:
        """The scope of a model's requests: one object a model for the whole run."""
        scope = self._scopes.get(model)
        if scope is None:
            scope = self._scopes[model] = Scope(self.endpoint, self.key_digest, model)
        return scope

    def attempt(self, request: MeteredRequest) -> Attempt:
        """`async with meter.attempt(request) as a:` waits for the budgets of one attempt."""
        return Attempt(self, request)

    def answering(self, within: float) -> bool:
        """Whether some attempt was answered (not refused with a 429) within `within` s."""
        return anyio.current_time() - self.last_answer < within

    async def settle(self, attempt: Attempt, error: BaseException | None) -> None:
        """Close an attempt's lease and spend reservation with what it cost."""
        request, answer, lease = attempt.request, attempt.answer, attempt.lease
        if attempt.started is not None:
            attempt.seconds = time.perf_counter() - attempt.started
        usd: float | None = None
        if answer is not None:
            attempt.charge = self._charge(request, answer, attempt.sent_at or self.clock.now())
            usd = attempt.charge.usd
        self.spend.settle(request.worst_usd, usd)
        if lease is None:
            return
        if not attempt.sent:  # nothing left: everything the attempt took goes back
            await self.limiter.cancel(lease)
            return
        outcome = outcome_of(error, answer)
        if outcome is not Outcome.RATE_LIMITED and outcome is not Outcome.OTHER:
            self.last_answer = anyio.current_time()
        limited = error if isinstance(error, RateLimited) else None
        await self.limiter.settle(
            lease,
            outcome=outcome,
            prompt_tokens=answer.prompt_tokens if answer else None,
            completion_tokens=answer.completion_tokens if answer else None,
            retry_after=limited.retry_after if limited else None,
            headers=answer.headers if answer else (limited.headers if limited else None),
        )

    def _charge(self, request: MeteredRequest, answer: Completion, at: datetime) -> Charge:
        model = request.model
        return self.prices.charge(
            model if answer.model is None or self.prices.knows(model) else answer.model,
            at,
            prompt_tokens=answer.prompt_tokens,
            cache_hit_tokens=answer.prompt_cache_hit_tokens,
            cache_miss_tokens=answer.prompt_cache_miss_tokens,
            completion_tokens=answer.completion_tokens,
            prompt_at_most=request.prompt_at_most,
            completion_cap=request.completion_cap,
        )

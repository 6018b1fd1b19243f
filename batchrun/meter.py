"""Metering one attempt: the rate limiter's lease, the spend cap's reservation and the price.

    request = meter.request(body)            # estimated and priced once per row
    async with meter.attempt(request) as a:  # waits for the budgets
        a.sending()
        a.received(await send(request.body))

On leaving the block the attempt is settled whatever happened, cancellation included (the
settling is shielded): the lease is settled with the outcome and the usage, or cancelled if
nothing was sent; the spend cap learns the real charge. This module owns which outcome an
error is for the limiter, and how an answer is charged.

The common attempt (a local limiter with budget at hand, room under a local spend cap, the
model off-peak if the run waits for off-peak) takes its lease and settles it without an
await, a cancel scope or an Event (issue 12): `Attempt._lease_at_once`,
`AttemptMeter.settle_at_once`, and a deferred lease deadline (`AttemptMeter.attempt`).
Anything that must wait takes the awaited path, as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio

from batchrun import tokens
from batchrun.client import Completion
from batchrun.clock import SYSTEM_CLOCK, Clock, epoch_us_reader, loop_clock
from batchrun.epoch import from_epoch_us
from batchrun.errors import LeaseExpired, RateLimited, RetryableError
from batchrun.limits import ImmediateSpendBudget, Outcome, Settlement, SpendBudget
from batchrun.prices import Charge, PriceTable
from batchrun.ratelimit import ImmediateRateLimiter, Lease, RateLimiter, Scope
from batchrun.schedule import OffPeakSchedule

#: seconds a wait may run past its own deadline (raising, cleaning up) before it ends
DEADLINE_SLACK = 1.0


def outcome_of(error: BaseException | None, answer: Completion | None) -> Outcome:
    """How an attempt ended, as far as the limiter cares."""
    if answer is not None:
        return Outcome.OK
    if isinstance(error, RateLimited):
        return Outcome.RATE_LIMITED
    if isinstance(error, RetryableError) and error.error_class in ("server", "server_busy"):
        return Outcome.SERVER_ERROR
    return Outcome.OTHER


@dataclass(slots=True)
class MeteredRequest:
    """A request body with what its attempts reserve: estimated and priced once per row.

    A value, never changed once made; not a frozen dataclass only because one is made per
    row and a frozen one costs several times as much to make (issue 12)."""

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

    __slots__ = (
        "_cleared_us",
        "_deadline",
        "_deferred",
        "_meter",
        "answer",
        "charge",
        "lease",
        "request",
        "seconds",
        "sent_us",
        "started",
    )

    def __init__(self, meter: AttemptMeter, request: MeteredRequest, *, deferred: bool) -> None:
        self._meter = meter
        self.request = request
        self.lease: Lease | None = None
        #: cancels the block at the lease's expiry (None: deferred, or not entered yet)
        self._deadline: anyio.CancelScope | None = None
        #: the block puts its own waits under `deadline()`: see `AttemptMeter.attempt`
        self._deferred = deferred
        #: wall-clock time (epoch microseconds, `epoch.epoch_us`) and `perf_counter()` when
        #: the request left (None: never sent)
        self.sent_us: int | None = None
        #: the wall-clock time the attempt got its budgets (and the schedule let it go)
        self._cleared_us: int | None = None
        self.started: float | None = None
        #: seconds the request took, once the block is left
        self.seconds = 0.0
        self.answer: Completion | None = None
        #: what the answer is counted as costing, once the block is left
        self.charge: Charge | None = None

    def sending(self) -> None:
        """Note that the request is leaving now: from here on, the lease is settled."""
        cleared = self._cleared_us
        self.sent_us = self._meter.now_us() if cleared is None else cleared
        self.started = time.perf_counter()

    def resent(self) -> None:
        """The request goes again after waiting for the endpoint to come back (an outage):
        it is priced at the hour it really leaves."""
        self._cleared_us = None
        self.sent_us = self._meter.now_us()

    def received(self, answer: Completion) -> None:
        self.answer = answer

    def outlasts(self, seconds: float) -> bool:
        """Whether the lease is sure not to expire within `seconds` from now (and some
        slack): a wait known to end by then needs no `deadline()`."""
        assert self.lease is not None
        return self.lease.expires_at - self._meter.time() > seconds + DEADLINE_SLACK

    def deadline(self) -> LeaseDeadline:
        """`with attempt.deadline():` cuts the block short at the lease's expiry, raising
        `LeaseExpired`: for the waits of an attempt with a deferred deadline that are not
        known to end before it (`outlasts`)."""
        assert self.lease is not None
        return LeaseDeadline(self.lease.expires_at)

    def enter_at_once(self) -> bool:
        """`async with attempt:`'s entry and exit without a coroutine, when both can be had
        at once (issue 12): the deadline is deferred, the limiter settles at once, and the
        budgets are taken without a wait (`_lease_at_once`). True: entered; the caller
        must then call `leave_at_once` exactly once, whatever happens. False: nothing is
        taken; use `async with` (a new attempt)."""
        return self._deferred and self._meter.settles_at_once and self._lease_at_once()

    def leave_at_once(self, error: BaseException | None) -> None:
        """Leave an attempt entered with `enter_at_once`, as `__aexit__` would: settled
        with the answer received, or `error`."""
        self._meter.settle_at_once(self, error)

    async def __aenter__(self) -> Attempt:
        if not self._lease_at_once():
            await self._lease_waiting()
        if not self._deferred:
            assert self.lease is not None
            self._deadline = anyio.CancelScope(deadline=self.lease.expires_at)
            self._deadline.__enter__()
        return self

    def _lease_at_once(self) -> bool:
        """The fast path of entering (issue 12): take the budgets without an await, no
        Event, no lock. It applies when the limiter `reserves_at_once` (and the spend cap,
        if any, reserves without a wait: `ImmediateSpendBudget`), its model is off-peak
        if the run waits for off-peak, the spend cap has room, and the limiter has budget
        at hand with nobody waiting. It is safe because each budget takes exactly what its
        awaited `reserve` would on a first pass, and says no (then everything taken goes
        back and the awaited path is taken) whenever anything would wait."""
        meter = self._meter
        reserve_now = meter.reserve_now
        if reserve_now is None:
            return False
        request, schedule = self.request, meter.schedule
        # the moment the request leaves, read once: the schedule's check and the price agree
        cleared = meter.now_us()
        if schedule is not None and (
            schedule.stopping or schedule.at_peak(request.model, from_epoch_us(cleared))
        ):
            return False
        spend = meter.spend_now
        if spend is not None and not spend.try_reserve(request.worst_usd):
            return False
        lease: Lease | None = None
        try:
            lease = reserve_now(
                request.scope,
                prompt_tokens=request.prompt_tokens,
                completion_cap=request.completion_cap,
                now=meter.time(),
            )
        finally:
            if lease is None and spend is not None:  # refused, or raised: nothing is held
                spend.settle(request.worst_usd, None)
        if lease is None:
            return False
        self.lease, self._cleared_us = lease, cleared
        return True

    async def _lease_waiting(self) -> None:
        """Wait for the schedule, the spend cap and the limiter, then take the budgets."""
        meter, request = self._meter, self.request
        schedule = meter.schedule
        while True:
            # off-peak runs: no budget is held while waiting; and a wait is no silence of the
            # server, so the 429s met on resuming are asked again as after any answer
            if schedule is not None and await schedule.wait_off_peak(request.model):
                meter.last_answer = max(meter.last_answer, meter.time())
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
            self._cleared_us = cleared = meter.now_us()
            if (
                schedule is None
                or schedule.stopping
                or not schedule.at_peak(request.model, from_epoch_us(cleared))
            ):
                return
            # peak began while the attempt waited for its budgets: give them back, wait again
            meter.spend.settle(request.worst_usd, None)
            with anyio.CancelScope(shield=True):
                await meter.limiter.cancel(self.lease)
            self.lease = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        meter = self._meter
        deadline = self._deadline
        error = exc
        if deadline is not None:
            deadline.__exit__(exc_type, exc, tb)
            if deadline.cancelled_caught:
                error = LeaseExpired()  # the block was cancelled at the lease's expiry
        if meter.settles_at_once:
            meter.settle_at_once(self, error)  # never suspends: no cancellation can reach it
        else:
            with anyio.CancelScope(shield=True):
                await meter.settle(self, error)
        if error is not None and error is not exc:
            raise error from None


class LeaseDeadline:
    """A block cut short at a lease's expiry, raising `LeaseExpired` (`Attempt.deadline`)."""

    __slots__ = ("_scope",)

    def __init__(self, expires_at: float) -> None:
        self._scope = anyio.CancelScope(deadline=expires_at)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # the scope swallows only its own cancellation: that is raised as LeaseExpired
        self._scope.__exit__(exc_type, exc, tb)
        if self._scope.cancelled_caught:
            raise LeaseExpired from None


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
        #: the event loop's clock (`anyio.current_time()`), read cheaply
        self.time = loop_clock()
        #: `clock` as epoch microseconds: when a request is sent, so what it costs
        self.now_us = epoch_us_reader(clock)
        # which fast paths apply is decided here, once per run, from the methods the
        # limiter and the spend cap have (`ImmediateRateLimiter`, `ImmediateSpendBudget`)
        immediate = limiter if isinstance(limiter, ImmediateRateLimiter) else None
        #: the limiter when it settles and cancels without a wait (`settle_at_once`, no
        #: shield); None: `settle` is awaited
        self._immediate = immediate if immediate is not None and immediate.settles_at_once else None
        self.settles_at_once = self._immediate is not None
        #: the spend cap's reservation without a wait, if it has a cap and can
        self.spend_now = (
            spend if spend.cap is not None and isinstance(spend, ImmediateSpendBudget) else None
        )
        #: the fast path of `Attempt.__aenter__` (None: every attempt takes the awaited one)
        self.reserve_now = (
            immediate.try_reserve
            if immediate is not None
            and immediate.reserves_at_once
            and (spend.cap is None or self.spend_now is not None)
            else None
        )
        #: `anyio.current_time()` of the last answer of any attempt (at first: the start)
        self.last_answer = self.time()

    def request(self, body: dict[str, Any]) -> MeteredRequest:
        model = body.get("model")
        if type(model) is not str:
            model = str(model)
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
            scope=self._scopes.get(model) or self._scope(model),
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

    def attempt(self, request: MeteredRequest, *, deferred_deadline: bool = False) -> Attempt:
        """`async with meter.attempt(request) as a:` waits for the budgets of one attempt.

        The block is cut short at the lease's expiry (`LeaseExpired`). With
        `deferred_deadline`, it is not: the caller promises that the block waits only where
        it knows the wait ends before then (`Attempt.outlasts`, such as a send bounded by
        the client's own timeout) or under `Attempt.deadline()`, and the common attempt
        enters no cancel scope (issue 12).
        """
        return Attempt(self, request, deferred=deferred_deadline)

    def answering(self, within: float) -> bool:
        """Whether some attempt was answered (not refused with a 429) within `within` s."""
        return self.time() - self.last_answer < within

    async def settle(self, attempt: Attempt, error: BaseException | None) -> None:
        """Close an attempt's lease and spend reservation with what it cost."""
        now = self.time()
        lease, settlement = attempt.lease, self._account(attempt, error, now)
        if lease is None:
            return
        if settlement is None:  # nothing left: everything the attempt took goes back
            await self.limiter.cancel(lease)
        else:
            await self.limiter.settle(lease, settlement)

    def settle_at_once(self, attempt: Attempt, error: BaseException | None) -> None:
        """`settle` with a limiter that `settles_at_once`: no coroutine, and no shield
        needed, since nothing here can be cancelled."""
        now = self.time()
        answer, lease, started = attempt.answer, attempt.lease, attempt.started
        if answer is not None and lease is not None and started is not None:
            self._settle_answered(attempt, answer, lease, started, now)
            return
        lease, settlement = attempt.lease, self._account(attempt, error, now)
        if lease is None:
            return
        immediate = self._immediate
        assert immediate is not None  # `settles_at_once`
        if settlement is None:
            immediate.cancel_now(lease, now)
        else:
            immediate.settle_now(lease, settlement, now)

    def _settle_answered(
        self, attempt: Attempt, answer: Completion, lease: Lease, started: float, now: float
    ) -> None:
        """`settle_at_once` of the common attempt, a sent request answered: what `_account`
        and the limiter's `settle_now` do for an answer (whatever error, an answer is an OK
        outcome), straight through (issue 12)."""
        request = attempt.request
        attempt.seconds = time.perf_counter() - started
        charge = attempt.charge = self._charge(request, answer, attempt.sent_us)
        self.spend.settle(request.worst_usd, charge.usd)
        self.last_answer = now
        settlement = Settlement(
            Outcome.OK, answer.prompt_tokens, answer.completion_tokens, None, answer.headers
        )
        assert self._immediate is not None  # `settles_at_once`
        self._immediate.settle_now(lease, settlement, now)

    def _account(
        self, attempt: Attempt, error: BaseException | None, now: float
    ) -> Settlement | None:
        """Settle all but the lease: the attempt's time, its charge, its spend reservation.
        Returns what to settle the lease with; None if nothing was sent (cancel it)."""
        request, answer = attempt.request, attempt.answer
        if attempt.started is None:
            self.spend.settle(request.worst_usd, None)
            return None
        attempt.seconds = time.perf_counter() - attempt.started
        usd: float | None = None
        if answer is not None:
            attempt.charge = self._charge(request, answer, attempt.sent_us)
            usd = attempt.charge.usd
        self.spend.settle(request.worst_usd, usd)
        outcome = outcome_of(error, answer)
        if outcome is Outcome.OK or outcome is Outcome.SERVER_ERROR:  # answered, if not cleanly
            self.last_answer = now
        if answer is not None:
            return Settlement(
                outcome,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                headers=answer.headers,
            )
        limited = error if isinstance(error, RateLimited) else None
        return Settlement(
            outcome,
            retry_after=limited.retry_after if limited else None,
            headers=limited.headers if limited else None,
        )

    def _charge(self, request: MeteredRequest, answer: Completion, sent_us: int | None) -> Charge:
        """What an answer sent at `sent_us` (epoch microseconds; None: now) costs."""
        model = request.model
        return self.prices.charge(
            model if answer.model is None or self.prices.knows(model) else answer.model,
            self.now_us() if sent_us is None else sent_us,
            prompt_tokens=answer.prompt_tokens,
            cache_hit_tokens=answer.prompt_cache_hit_tokens,
            cache_miss_tokens=answer.prompt_cache_miss_tokens,
            completion_tokens=answer.completion_tokens,
            prompt_at_most=request.prompt_at_most,
            completion_cap=request.completion_cap,
        )

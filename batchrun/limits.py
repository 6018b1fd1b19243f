"""Rate budgets: RPM and TPM buckets, the shared 429 pause, and adaptive concurrency.

One `Limiter` serves every worker of a run (the pool reaches it through the `RateLimiter`
protocol in `ratelimit.py`, whose local implementation wraps it; a cluster-wide limiter
replaces that, not this):

    reservation = await limiter.reserve(prompt_tokens=..., completion_cap=...)
    # or, when nothing need wait, at once (None: call `reserve`):
    reservation = limiter.try_reserve(prompt_tokens=..., completion_cap=..., now=...)
    ... send ...
    limiter.settle(reservation, Settlement(outcome, prompt_tokens=..., completion_tokens=...))

What it learns from the server, each in a small object: `TokenBucket` (a budget's pace),
`AdaptiveConcurrency` (how many in flight), `Backoff` (429s that give no delay: one shared,
growing pause, and whether they are a rate limit or a concurrency limit) and `RateLearner`
(the request rate such a rate limit allows). The arithmetic is pure and takes `now` or send
numbers, so it is tested without a clock; the `Limiter` on trio's mock clock.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

import anyio
import structlog

from batchrun.errors import CostCapReached

log = structlog.get_logger("batchrun.limits")

#: a bucket holds this share of its budget: requests are paced, not burst
BURST_SHARE = 0.01
#: the pace keeps this share of the budget in reserve for timing jitter between us and the server
PACE_SHARE = 0.99


class Outcome(Enum):
    """How an attempt ended, as far as the limiter cares."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a sent attempt ended and what it cost: what a lease is settled with."""

    outcome: Outcome
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: the server's Retry-After on a 429, in seconds
    retry_after: float | None = None
    #: the answer's headers (the server's x-ratelimit figures)
    headers: Mapping[str, str] | None = None


# -- pure arithmetic --------------------------------------------------------------------------


class TokenBucket:
    """A continuously refilling bucket.

    It holds a small share of the budget and refills at the budget's pace. A request larger
    than the bucket is let through alone when the bucket is full, leaving it in debt, so it
    is never stuck.
    """

    __slots__ = ("capacity", "level", "limit", "rate", "updated", "window")

    def __init__(self, limit: float, *, window: float, now: float) -> None:
        self.window = window
        self.limit = limit
        self.capacity = 0.0
        self.rate = 0.0
        self.level = 0.0
        self.updated = now
        self.set_limit(limit, now=now)
        self.level = self.capacity

    def set_limit(self, limit: float, *, now: float) -> None:
        """Change the budget (per window), keeping the current level within the new bucket."""
        self.refill(now)
        self.limit = limit
        self.capacity = max(1.0, limit * BURST_SHARE)
        self.rate = max(limit * PACE_SHARE - self.capacity, limit * 0.5) / self.window
        self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until `amount` may be taken (0 if now)."""
        self.refill(now)
        needed = min(amount, self.capacity) - self.level
        return 0.0 if needed <= 1e-9 else needed / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        """Return unused tokens (negative: charge an overrun)."""
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str) -> float | None:
    """Seconds in a Go-style duration (`1s`, `6m0s`, `850ms`) or a plain number of seconds."""
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


class AdaptiveConcurrency:
    """How many requests may be in flight, learnt from the server's answers.

    Starts where what is known allows (the caller says where: the user's explicit
    concurrency, or rpm x expected latency) and, before any 429, grows by half a slot per
    clean answer while the pool is saturated (x1.5 a round of answers: a faster climb
    overshoots a concurrency limit by more than 1% of requests). A 429 that
    tracks what is in flight shrinks it multiplicatively and records the level where it
    happened as a ceiling. Below the ceiling it grows back quickly; at the ceiling it probes
    upward only slowly, so a server's concurrency limit costs few 429s. 5xx answers pause
    growth, never shrink.
    """

    DECREASE = 0.7
    #: growth per clean answer before any 429 (x1.5 a round: a bounded overshoot)
    START_STEP = 0.5
    #: growth per clean answer below the ceiling, and at it (one step per ~50 rounds)
    FAST_STEP = 0.5
    PROBE_ROUNDS = 50

    def __init__(self, maximum: int, *, start: int = 8, growth_pause: float = 2.0) -> None:
        self.maximum = maximum
        self.value = float(max(1, min(maximum, start)))
        self.ceiling: int | None = None
        self.growth_pause = growth_pause
        self._no_growth_until = -math.inf
        #: sends numbered in order; a 429 on a send from before the last shrink is old news
        self._shrunk_at_send = 0

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    def snapshot(self) -> tuple[float, int | None]:
        return self.value, self.ceiling

    def restore(self, snapshot: tuple[float, int | None]) -> None:
        """Undo shrinks that turned out to answer a rate limit, not a concurrency limit."""
        self.value, self.ceiling = snapshot

    def on_success(self, *, saturated: bool, now: float, send_number: int = 0) -> None:
        if send_number and send_number <= self._shrunk_at_send:
            return  # sent before the last shrink: says nothing about the new level
        if not saturated or now < self._no_growth_until or self.value >= self.maximum:
            return
        if self.ceiling is None:
            self.value += self.START_STEP
        elif self.value < self.ceiling:
            self.value = min(self.value + self.FAST_STEP, float(self.ceiling))
        else:
            self.value += 1.0 / (self.value * self.PROBE_ROUNDS)
            if int(self.value) > self.ceiling:
                self.ceiling = int(self.value)  # the probe went through: the limit moved up
        self.value = min(self.value, float(self.maximum))

    def on_rate_limited(self, *, in_flight_at_send: int, send_number: int) -> bool:
        """Shrink after a 429; returns whether it did (once per round of sends).

        A 429 on a probe above the known ceiling only steps back to the ceiling; one at or
        below it (or before any is known) shrinks multiplicatively and lowers the ceiling.
        """
        if send_number <= self._shrunk_at_send:
            return False
        if self.ceiling is not None and in_flight_at_send > self.ceiling:
            self.value = float(self.ceiling)
            return True
        below = max(1, in_flight_at_send - 1)
        if self.ceiling is not None:
            below = min(below, self.ceiling - 1)
        self.ceiling = max(1, below)
        self.value = max(1.0, min(self.value, float(in_flight_at_send)) * self.DECREASE)
        return True

    def mark_shrink(self, send_number: int) -> None:
        self._shrunk_at_send = send_number

    def on_server_error(self, now: float) -> None:
        self._no_growth_until = now + self.growth_pause


@dataclass(slots=True)
class Backoff:
    """What 429s without a usable delay have shown: one pause for every worker, growing.

    An episode starts with such a 429: every worker waits `base` seconds. Once a request sent
    after that pause is refused too, requests go one at a time (a probe each) and each probe
    refused grows the shared pause (x GROWTH, up to `maximum`). An answer to a request sent
    after the episode began ends it.

    A concurrency 429 (DeepSeek's, also without headers) tracks what is in flight: it stops
    as soon as fewer requests are out. A rate-window 429 persists however few are: so an
    episode is a rate limit once a probe sent with at most half the in-flight count of the
    episode's first 429 is refused too. Until then it is taken for a concurrency limit.
    """

    GROWTH = 1.5

    base: float
    maximum: float
    active: bool = False
    #: sends numbered up to this were out when the episode began
    started_send: int = 0
    #: 429s on sends numbered up to this belong to a round the current pause already answers
    paused_at_send: int = 0
    in_flight_at_start: int = 0
    refused_probes: int = 0
    rate_like: bool = False
    probe_out: bool = False
    probe_sent_at: float = -math.inf
    #: adaptive concurrency before the episode, restored if it turns out a rate limit
    concurrency_before: tuple[float, int | None] | None = None

    def begin(
        self, *, sends: int, in_flight: int, concurrency: tuple[float, int | None] | None
    ) -> None:
        self.active = True
        self.started_send = self.paused_at_send = sends
        self.in_flight_at_start = in_flight
        self.refused_probes = 0
        self.rate_like = False
        self.concurrency_before = concurrency

    def refused_again(self, *, sends: int, in_flight_at_send: int) -> bool:
        """A send made after the last pause was refused: grow the pause. Returns whether this
        refusal shows the episode is a rate limit (first time only)."""
        self.refused_probes += 1
        self.paused_at_send = sends
        if self.rate_like or in_flight_at_send > max(1, self.in_flight_at_start // 2):
            return False
        self.rate_like = True
        return True

    @property
    def one_at_a_time(self) -> bool:
        return self.active and self.refused_probes > 0

    @property
    def pause(self) -> float:
        return min(self.maximum, self.base * self.GROWTH**self.refused_probes)


@dataclass(slots=True)
class RateLearner:
    """A request rate learnt from header-less rate-limit episodes: the requests the server
    admitted from the end of one episode (or the first send) to the end of the next, over
    that time. Each later episode means the pace was still too fast: it only lowers it."""

    #: what share of the measured rate to budget (room for timing jitter)
    SHARE = 0.95

    since: float | None = None
    admitted: int = 0
    #: requests per second
    rate: float | None = None

    def episode_ended(self, now: float) -> float | None:
        if self.since is None or now <= self.since:
            return self.rate
        measured = self.admitted / (now - self.since) * self.SHARE
        self.rate = measured if self.rate is None else min(self.rate * self.SHARE, measured)
        self.since, self.admitted = now, 0
        return self.rate


# -- the limiter ------------------------------------------------------------------------------

#: seconds an answer is expected to take before any has come back: with an RPM budget,
#: adaptive concurrency starts at rpm x this, so the budget is usable from the first second
EXPECTED_LATENCY = 2.0
#: completion tokens a request reserves before any answer has come back, when the server
#: counts real usage (then the observed 95th percentile, within each request's cap)
COMPLETION_PRIOR = 256
#: seconds after which a probe not yet refused counts as admitted: the next request may go
PROBE_PATIENCE = 2.0
#: seconds after which a request not refused counts as admitted, for concurrency growth
ADMITTED_AFTER = PROBE_PATIENCE
#: the server's rate-limit headers per kind: limit, remaining, reset
_RATELIMIT_HEADERS = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}
_LIMIT_REQUESTS = _RATELIMIT_HEADERS["requests"][0]
_LIMIT_TOKENS = _RATELIMIT_HEADERS["tokens"][0]
#: answers after which the completion estimate is refreshed only every 50
EARLY_ANSWERS = 20


class CompletionEstimate:
    """Completion tokens a request reserves: its cap when the server charges the cap
    (`tpm_counts = "max_tokens"`); otherwise a prior, then the 95th percentile of what the
    last 1,000 answers used, within the cap. The percentile moves with every answer at
    first (the prior is left within a few), then every 50 answers: a sort of 1,000 numbers
    per request would cost more than the rest of the limiter (issue 12)."""

    def __init__(self, tpm_counts: str) -> None:
        self._charges_cap = tpm_counts == "max_tokens"
        self._seen: deque[int] = deque(maxlen=1000)
        self._estimate: int | None = None
        self._since_estimate = 0

    def allowance(self, cap: int) -> int:
        if self._charges_cap:
            return cap
        if self._estimate is None:
            return min(cap, COMPLETION_PRIOR)
        return min(cap, self._estimate)

    def record(self, tokens: int) -> None:
        """An answer used `tokens` completion tokens."""
        self._seen.append(tokens)
        self._since_estimate += 1
        if len(self._seen) <= EARLY_ANSWERS or self._since_estimate >= 50:
            ordered = sorted(self._seen)
            self._estimate = ordered[max(0, math.ceil(len(ordered) * 0.95) - 1)]
            self._since_estimate = 0


@dataclass(frozen=True)
class LimiterStatistics:
    """A snapshot of the limiter, for progress displays and tests."""

    concurrency: int
    in_flight: int
    waiting: int
    paused_for: float
    rpm_limit: float | None
    tpm_limit: float | None
    rate_limited: int
    #: tokens reserved by requests in flight
    reserved_tokens: int
    #: requests per window learnt from 429s without a delay (None: none learnt)
    learnt_rpm: float | None = None


@dataclass(slots=True)
class Reservation:
    """What one attempt took from the budgets."""

    tokens: int
    prompt_tokens: int
    completion_cap: int
    send_number: int
    in_flight_at_send: int
    #: tokens taken from the token bucket (at most what it holds; the rest is charged on
    #: settling, from the real usage)
    taken_tokens: float = 0.0
    #: sent as the one probe of a header-less 429 episode
    probe: bool = False
    #: what holds its concurrency slot (`CapacityLimiter` borrower): its own token, not the
    #: reserving task, so no task look-up on taking or giving it back (issue 12)
    slot: object = None


class Limiter:
    """The budgets of one run, shared by all its workers."""

    def __init__(
        self,
        *,
        concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        window: float = 60.0,
        adaptive: bool = True,
        tpm_counts: str = "usage",
        start_concurrency: int = 8,
        fallback_pause: float = 1.0,
        max_pause: float = 60.0,
        expected_latency: float = EXPECTED_LATENCY,
    ) -> None:
        now = anyio.current_time()
        self.window = window
        self.tpm_counts = tpm_counts
        self.fallback_pause = fallback_pause
        self._rpm_configured = rpm
        self._tpm_configured = tpm
        self.requests = TokenBucket(rpm, window=window, now=now) if rpm else None
        self.tokens = TokenBucket(tpm, window=window, now=now) if tpm else None
        start = start_concurrency
        if rpm:  # enough in flight to use the budget at the expected latency
            start = max(start, math.ceil(rpm / window * expected_latency))
        self.adaptive = AdaptiveConcurrency(concurrency, start=start) if adaptive else None
        self._slots = anyio.CapacityLimiter(self.adaptive.limit if self.adaptive else concurrency)
        # fast_acquire: a free lock is taken without a trip through the event loop
        self._dispatch = anyio.Lock(fast_acquire=True)
        self._budget_changed = anyio.Event()
        #: tasks waiting on `_budget_changed` (read on every settle: cheaper than asking it)
        self._budget_waiters = 0
        self._paused_until = -math.inf
        self._backoff = Backoff(base=fallback_pause, maximum=max(max_pause, fallback_pause))
        self._learner = RateLearner()
        #: sends not yet answered, oldest first: send number -> when last counted for growth
        self._unanswered: dict[int, float] = {}
        self._in_flight = 0
        self._waiting = 0
        self._sends = 0
        self._rate_limited = 0
        self._reserved_tokens = 0
        self._completions = CompletionEstimate(tpm_counts)

    # -- reserve / settle -----------------------------------------------------------------

    def completion_allowance(self, cap: int) -> int:
        """Completion tokens to reserve for a request capped at `cap` (`CompletionEstimate`)."""
        return self._completions.allowance(cap)

    async def reserve(self, *, prompt_tokens: int, completion_cap: int) -> Reservation:
        """Wait for a concurrency slot, the end of any pause, and room in the buckets."""
        tokens = prompt_tokens + self.completion_allowance(completion_cap)
        slot = object()  # the borrower of its slot: unique while held
        while True:
            self._waiting += 1
            try:
                await self._acquire_slot(slot)
            finally:
                self._waiting -= 1
            took = self._take_unqueued(tokens, anyio.current_time())
            if took is not None:
                break
            try:
                async with self._dispatch:  # one task at a time waits on the buckets, in order
                    took = await self._wait_for_budget(tokens)
            except BaseException:
                self._slots.release_on_behalf_of(slot)
                raise
            if took is not None:
                break
            # concurrency shrank while this task waited: its slot is no longer one to use,
            # and it took nothing from the buckets
            self._slots.release_on_behalf_of(slot)
        return self._reserved(
            tokens, prompt_tokens, completion_cap, took, anyio.current_time(), slot
        )

    def try_reserve(
        self, *, prompt_tokens: int, completion_cap: int, now: float
    ) -> Reservation | None:
        """`reserve` when it would not wait: a free slot, nobody in line for a slot or the
        buckets, no pause, and room in the buckets at `now` (`anyio.current_time()`). None:
        nothing taken; call `reserve`. No await, no lock: the common case (issue 12).

        Safe because it takes exactly what `reserve` takes on its first pass, and only when
        no task waits (a waiting task is never overtaken)."""
        if self._waiting:
            return None
        tokens = prompt_tokens + self._completions.allowance(completion_cap)
        slot = self._sends + 1  # its send number: unique among the slots held
        took = self._take_unqueued(tokens, now, acquire=slot)
        if took is None:
            return None
        return self._reserved(tokens, prompt_tokens, completion_cap, took, now, slot)

    def _reserved(
        self,
        tokens: int,
        prompt_tokens: int,
        completion_cap: int,
        took: tuple[float, bool],
        now: float,
        slot: object,
    ) -> Reservation:
        """Count a request that holds its slot (borrowed as `slot`) and has taken its budget."""
        self._in_flight += 1
        self._sends += 1
        if self._learner.since is None:
            self._learner.since = now
        adaptive = self.adaptive
        # a send made while concurrency is at its maximum is not tracked for growth: growth
        # stops there, and a later shrink marks every send made before it as old news (only
        # an episode's restore to a level below the maximum could have counted it: a credit
        # of half a slot lost, at worst, against a dict entry a request saved)
        if adaptive is not None and adaptive.value < adaptive.maximum:
            self._unanswered[self._sends] = now
        taken, probe = took
        self._reserved_tokens += tokens
        return Reservation(
            tokens, prompt_tokens, completion_cap, self._sends, self._in_flight, taken, probe, slot
        )

    async def _acquire_slot(self, slot: object) -> None:
        """Wait for a concurrency slot. While waiting, each request out for `ADMITTED_AFTER`
        without a refusal counts as a clean answer for growth, once a period: a concurrency
        429 comes back at once, so with long answers concurrency need not wait whole answers
        to climb (x1.5 every `ADMITTED_AFTER` rather than every answer's latency)."""
        try:  # a free slot is taken without a timer or a trip through the event loop
            self._slots.acquire_on_behalf_of_nowait(slot)
            return
        except anyio.WouldBlock:
            pass
        if self.adaptive is None:  # no credit to give while waiting
            await self._slots.acquire_on_behalf_of(slot)
            return
        while True:
            with anyio.move_on_after(ADMITTED_AFTER):
                await self._slots.acquire_on_behalf_of(slot)
                return
            self._credit_admitted(anyio.current_time())

    def _credit_admitted(self, now: float) -> None:
        unanswered = self._unanswered
        while unanswered:
            send_number, sent_at = next(iter(unanswered.items()))
            if sent_at > now - ADMITTED_AFTER:
                break
            del unanswered[send_number]
            unanswered[send_number] = now  # counted again each period it stays out
            self._grow(send_number, now)

    def _grow(self, send_number: int, now: float) -> None:
        adaptive = self.adaptive
        if adaptive is None or adaptive.value >= adaptive.maximum:  # nothing to grow
            return
        before = adaptive.limit
        adaptive.on_success(saturated=self._saturated(), now=now, send_number=send_number)
        if adaptive.limit != before:
            self._slots.total_tokens = adaptive.limit

    def _take_unqueued(
        self, tokens: int, now: float, *, acquire: object = None
    ) -> tuple[float, bool] | None:
        """Take the request's budget at once if no task waits on the buckets and it may go
        now: no lock and no coroutine in the common case (issue 12). None: nothing taken,
        wait in line (`_wait_for_budget`). `acquire`: take a free slot too (none is held), on
        behalf of this borrower."""
        if (
            self._dispatch.locked()
            or self._in_flight >= self._slots.total_tokens
            or (self.tokens is not None and tokens > self.tokens.limit)  # warned in line
            or self._delay(tokens, now) > 0
        ):
            return None
        if acquire is not None:
            try:
                self._slots.acquire_on_behalf_of_nowait(acquire)
            except anyio.WouldBlock:  # a task is in line for a slot
                return None
        return self._take(tokens, now)

    def _delay(self, tokens: int, now: float) -> float:
        """Seconds until a request of `tokens` may go (<= 0: now)."""
        delay = self._paused_until - now
        if self._backoff.one_at_a_time and self._backoff.probe_out:
            # one probe at a time: wait for its answer, or until it has been out long
            # enough that it was plainly admitted (a refusal comes back at once)
            delay = max(delay, self._backoff.probe_sent_at + PROBE_PATIENCE - now)
        if self.requests is not None:
            delay = max(delay, self.requests.wait_time(1, now))
        if self.tokens is not None:
            delay = max(delay, self.tokens.wait_time(tokens, now))
        return delay

    def _take(self, tokens: int, now: float) -> tuple[float, bool]:
        """Take a request and its tokens from the buckets: the tokens taken, and whether it
        is an episode's probe."""
        taken = 0.0
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            # never more than the bucket holds: the rest is charged from real usage
            taken = min(float(tokens), self.tokens.capacity)
            self.tokens.take(taken, now)
        probe = self._backoff.one_at_a_time
        if probe:
            self._backoff.probe_out = True
            self._backoff.probe_sent_at = now
        return taken, probe

    async def _wait_for_budget(self, tokens: int) -> tuple[float, bool] | None:
        """Wait until the request may go, then take its request and tokens; returns the
        tokens taken and whether it is an episode's probe, or None (nothing taken) when
        concurrency shrank meanwhile."""
        if self.tokens is not None and tokens > self.tokens.limit:
            log.warning(
                "request_larger_than_tpm",
                tokens=tokens,
                tpm=self.tokens.limit,
                note="sent alone once the token bucket is full",
            )
        while True:
            if self._in_flight >= self._slots.total_tokens:
                return None
            now = anyio.current_time()
            delay = self._delay(tokens, now)
            if delay <= 0:
                return self._take(tokens, now)
            # woken early when budget comes back (a settle, a cancel, an episode's end)
            with anyio.move_on_after(delay):
                self._budget_waiters += 1
                try:
                    await self._budget_changed.wait()
                finally:
                    self._budget_waiters -= 1

    def _wake(self) -> None:
        if self._budget_waiters:  # no new Event a request for none
            self._budget_changed.set()
            self._budget_changed = anyio.Event()

    def cancel(self, reservation: Reservation, *, now: float | None = None) -> None:
        """Give back everything an attempt reserved but never sent: its slot, its request and
        its tokens. Nothing is learnt from it. `now`: `anyio.current_time()`, if read."""
        if now is None:
            now = anyio.current_time()
        self._in_flight -= 1
        self._reserved_tokens -= reservation.tokens
        self._slots.release_on_behalf_of(reservation.slot)
        self._unanswered.pop(reservation.send_number, None)
        if reservation.probe:
            self._backoff.probe_out = False
        if self.requests is not None:
            self.requests.give_back(1, now)
        if self.tokens is not None:
            self.tokens.give_back(reservation.taken_tokens, now)
        self._wake()

    def settle(
        self, reservation: Reservation, settlement: Settlement, *, now: float | None = None
    ) -> None:
        """Give back the slot and correct the buckets with what the attempt really cost.
        `now`: `anyio.current_time()`, if the caller has read it."""
        if now is None:
            now = anyio.current_time()
        self._in_flight -= 1
        self._reserved_tokens -= reservation.tokens
        self._slots.release_on_behalf_of(reservation.slot)
        self._unanswered.pop(reservation.send_number, None)
        if reservation.probe:
            self._backoff.probe_out = False
        outcome = settlement.outcome
        headers = settlement.headers
        # the common answer carries no x-ratelimit figures: two look-ups, no loop
        if headers is not None and (_LIMIT_REQUESTS in headers or _LIMIT_TOKENS in headers):
            self._follow_headers(headers, now)
        if outcome is Outcome.RATE_LIMITED:
            self._on_rate_limited(reservation, settlement.retry_after, now)
        else:
            if outcome is Outcome.OK:
                self._learner.admitted += 1
                self._on_ok(
                    reservation, settlement.prompt_tokens, settlement.completion_tokens, now
                )
                adaptive = self.adaptive
                if adaptive is not None and adaptive.value < adaptive.maximum:
                    self._grow(reservation.send_number, now)
            elif outcome is Outcome.SERVER_ERROR and self.adaptive is not None:
                self.adaptive.on_server_error(now)
            if outcome is not Outcome.OTHER and self._backoff.active:
                self._end_episode(reservation, now)
        if self._budget_waiters:
            self._wake()

    def _on_ok(
        self,
        reservation: Reservation,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        now: float,
    ) -> None:
        if completion_tokens is not None:
            self._completions.record(completion_tokens)
        if self.tokens is not None and prompt_tokens is not None:
            if self.tpm_counts == "usage":
                used = prompt_tokens + (completion_tokens or 0)
            else:  # the server charged the prompt plus the whole max_tokens when it admitted us
                used = prompt_tokens + reservation.completion_cap
            self.tokens.give_back(reservation.taken_tokens - used, now)

    def _saturated(self) -> bool:
        return self._waiting > 0 or self._in_flight + 1 >= self._slots.total_tokens

    def _on_rate_limited(
        self, reservation: Reservation, retry_after: float | None, now: float
    ) -> None:
        self._rate_limited += 1
        # a rejected request was not counted by the server: its budget comes back
        if self.requests is not None:
            self.requests.give_back(1, now)
        if self.tokens is not None:
            self.tokens.give_back(reservation.taken_tokens, now)
        if retry_after is not None:
            # the server said when: every worker waits for that (a fixed window's reset, a
            # sliding window's room), and nothing about concurrency is learnt
            self.pause(retry_after, now=now)
            return
        backoff = self._backoff
        if not backoff.active:
            backoff.begin(
                sends=self._sends,
                in_flight=reservation.in_flight_at_send,
                concurrency=self.adaptive.snapshot() if self.adaptive else None,
            )
            self._shrink(reservation)
            log.info("rate_limited_without_delay", pause=backoff.pause)
        elif reservation.send_number > backoff.paused_at_send:
            if backoff.refused_again(
                sends=self._sends, in_flight_at_send=reservation.in_flight_at_send
            ):
                # refused with few requests out: a rate window, not a concurrency limit
                if self.adaptive is not None and backoff.concurrency_before is not None:
                    self.adaptive.restore(backoff.concurrency_before)
                    self._slots.total_tokens = self.adaptive.limit
                log.info("rate_limit_window_found", pause=backoff.pause)
            if not backoff.rate_like:
                self._shrink(reservation)
        else:
            return  # one of the round the current pause already answers
        self.pause(backoff.pause, now=now)

    def _shrink(self, reservation: Reservation) -> None:
        if self.adaptive is None:
            return
        shrunk = self.adaptive.on_rate_limited(
            in_flight_at_send=reservation.in_flight_at_send,
            send_number=reservation.send_number,
        )
        if shrunk:
            self.adaptive.mark_shrink(self._sends)
            self._slots.total_tokens = self.adaptive.limit
            log.info(
                "concurrency_reduced",
                concurrency=self.adaptive.limit,
                ceiling=self.adaptive.ceiling,
                in_flight_at_send=reservation.in_flight_at_send,
            )

    def _end_episode(self, reservation: Reservation, now: float) -> None:
        """An answer to a request sent after a header-less 429 episode began ends it; a rate
        limit's episode teaches a request rate."""
        backoff = self._backoff
        if not backoff.active or reservation.send_number <= backoff.started_send:
            return
        backoff.active = False
        if not backoff.rate_like:
            return
        rate = self._learner.episode_ended(now)
        if rate is None or rate <= 0:
            return
        per_window = rate * self.window
        if self.requests is None:
            self.requests = TokenBucket(per_window, window=self.window, now=now)
        elif per_window < self.requests.limit:
            self.requests.set_limit(per_window, now=now)
        else:
            return
        log.info("request_rate_learnt", rpm=round(per_window, 1), window=self.window)

    def _follow_headers(self, headers: Mapping[str, str], now: float) -> None:
        """Let the server's own x-ratelimit figures correct a budget set too high."""
        for kind, bucket_attr, configured in (
            ("requests", "requests", self._rpm_configured),
            ("tokens", "tokens", self._tpm_configured),
        ):
            limit_name, remaining_name, reset_name = _RATELIMIT_HEADERS[kind]
            limit_text = headers.get(limit_name)
            if limit_text is None:
                continue
            try:
                server_limit = float(limit_text)
            except ValueError:
                continue
            bucket: TokenBucket | None = getattr(self, bucket_attr)
            if server_limit > 0 and (bucket is None or server_limit < bucket.limit):
                if bucket is None:
                    setattr(
                        self, bucket_attr, TokenBucket(server_limit, window=self.window, now=now)
                    )
                else:
                    bucket.set_limit(server_limit, now=now)
                log.info(
                    "budget_follows_server", kind=kind, limit=server_limit, configured=configured
                )
            remaining = headers.get(remaining_name)
            if remaining is not None and remaining.strip() in ("0", "0.0"):
                reset = parse_duration(headers.get(reset_name, ""))
                if reset:
                    self.pause(reset, now=now)

    def pause(self, seconds: float, *, now: float | None = None) -> None:
        """Hold every worker's next request for `seconds`."""
        if seconds <= 0:
            return
        current = anyio.current_time() if now is None else now
        self._paused_until = max(self._paused_until, current + seconds)

    def statistics(self) -> LimiterStatistics:
        now = anyio.current_time()
        learnt = self._learner.rate
        return LimiterStatistics(
            concurrency=int(self._slots.total_tokens),
            in_flight=self._in_flight,
            waiting=self._waiting,
            paused_for=max(0.0, self._paused_until - now),
            rpm_limit=self.requests.limit if self.requests else None,
            tpm_limit=self.tokens.limit if self.tokens else None,
            rate_limited=self._rate_limited,
            reserved_tokens=self._reserved_tokens,
            learnt_rpm=learnt * self.window if learnt is not None else None,
        )


class SpendBudget(Protocol):
    """What the meter needs from a spend cap: `SpendCap` here, a cluster-wide one in
    `ray_budget`. `settle` does not wait, so the meter may call it from a shielded exit."""

    cap: float | None

    @property
    def spent(self) -> float: ...

    async def reserve(self, worst: float) -> None:
        """Wait until `worst` fits under the cap; raises `CostCapReached` when it never will."""
        ...

    def settle(self, worst: float, actual: float | None) -> None:
        """Close a reservation with what the request really cost (None: nothing)."""
        ...


@runtime_checkable
class ImmediateSpendBudget(SpendBudget, Protocol):
    """A spend budget that can also reserve without awaiting (`SpendCap`; a cluster-wide
    cap could too): the attempt meter checks for it once per run and calls `try_reserve`
    on its fast path."""

    def try_reserve(self, worst: float) -> bool:
        """`reserve` when `worst` fits now: True, and it is reserved. False: nothing
        reserved; `reserve` waits or raises."""
        ...


class SpendCap:
    """A hard cap on spend: a request goes only if the spend so far plus the worst case of
    every request in flight, its own included, stays within the cap. While requests in
    flight may still come in under their worst case, a request waits for them; once none
    is in flight and it still does not fit, the cap is reached."""

    def __init__(self, cap: float | None, *, spent: float = 0.0) -> None:
        self.cap = cap
        self.spent = spent
        self.in_flight = 0.0
        self._requests = 0
        self._settled: anyio.Event | None = None

    def try_reserve(self, worst: float) -> bool:
        """`reserve` when `worst` fits now (or there is no cap): True, and it is reserved.
        False: nothing reserved; `reserve` waits or raises."""
        if self.cap is None:
            return True
        if self.spent + self.in_flight + worst > self.cap + 1e-12:
            return False
        self.in_flight += worst
        self._requests += 1
        return True

    async def reserve(self, worst: float) -> None:
        """Wait until `worst` fits under the cap.

        Raises:
            CostCapReached: it cannot fit even with nothing else in flight.
        """
        while not self.try_reserve(worst):
            assert self.cap is not None  # with no cap, everything fits
            if self._requests == 0:
                raise CostCapReached(spent=self.spent, cap=self.cap, next_worst=worst)
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    def settle(self, worst: float, actual: float | None) -> None:
        if self.cap is None:
            return
        self.in_flight = max(0.0, self.in_flight - worst)
        self._requests -= 1
        self.spent += actual or 0.0
        if self._settled is not None:
            self._settled.set()
            self._settled = None

"""One budget for a whole Ray run: a named actor holds it, workers lease from it in chunks.

The driver starts the actor; each worker (any process, any node) plugs a `LeasedRateLimiter`
and a `LeasedSpendCap` into its pool:

    handle = start_budget(job.limits, max_cost=job.max_cost, spent_usd=spent, name=name)
    run_job(shard_job, rate_limiter=worker_limiter(handle), spend_cap=worker_spend_cap(handle))
    stop_budget(handle)

The actor (`BudgetActor`) keeps, per endpoint and account, the RPM and TPM buckets, the
learned concurrency, the shared 429 pause, and for the run the spend cap. A worker takes
request permits, tokens and concurrency slots in chunks (`Ask` -> `Grant`), spends them
locally, and calls again at a low-water mark, when a chunk goes stale, or when it has
nothing left; what its answers really cost (token corrections, permits never used, clean
answers for concurrency growth) rides on its next call. A 429, or a server saying none is
remaining, is reported at once and pauses every worker. A worker that stops calling for
`lease_seconds` is taken for dead: its concurrency slots go back to the pool, and its spend
reservations count as spent at their worst case once their attempts' time is up.

Time in the actor is `time.monotonic()`; what crosses processes is durations (a pause's
remaining seconds), never instants, so clocks of different nodes need not agree.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from batchrun.errors import CostCapReached
from batchrun.limits import (
    BURST_SHARE,
    EXPECTED_LATENCY,
    AdaptiveConcurrency,
    CompletionEstimate,
    LimiterStatistics,
    Outcome,
    Settlement,
    SpendCap,
    TokenBucket,
    parse_duration,
)
from batchrun.ratelimit import LEASE_MARGIN, Lease, Scope

if TYPE_CHECKING:
    from batchrun.job import Limits
    from batchrun.ratelimit import RateLimiter

__all__ = [
    "Ask",
    "BudgetActor",
    "Grant",
    "LeasedRateLimiter",
    "LeasedSpendCap",
    "start_budget",
    "stop_budget",
    "worker_limiter",
    "worker_spend_cap",
]

#: seconds a worker's slots stay its own without a call from it (it calls at least every
#: `REFRESH` while it sends, so only a dead or finished worker's expire)
LEASE_SECONDS = 30.0
#: seconds after which a worker asks again before sending: the longest another worker's
#: 429 pause can go unnoticed
REFRESH = 0.25
#: permits and tokens a worker asks for at most in one call, in requests
CHUNK = 32
#: a worker tops up when it holds fewer permits than this
LOW_WATER = 2
#: seconds the actor holds a call that must wait (for a permit, tokens, a slot) before
#: answering with what it has; the worker then asks again
LONG_POLL = 0.5


@dataclass(slots=True)
class Ask:
    """One call from a worker: what it wants, what it must wait for, and what it settles."""

    #: permits and tokens it would like to hold; slots it would like to hold in all
    permits: int = 0
    tokens: float = 0.0
    slots: int = 0
    #: wait (up to `LONG_POLL`) for a permit / this many tokens / one slot more than in flight
    need_permit: bool = False
    need_tokens: float = 0.0
    need_slot: bool = False
    in_flight: int = 0
    #: settled since the last call: permits unused, tokens reserved minus used (negative: an
    #: overrun), clean answers
    permits_back: int = 0
    tokens_back: float = 0.0
    ok: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """The actor's answer: what was added, and the worker's slots in all."""

    permits: int
    tokens: float
    slots: int
    #: seconds every request in the scope must still wait (a shared 429 pause)
    paused_for: float


@dataclass(slots=True)
class _Holder:
    slots: int = 0
    seen: float = 0.0


class _ScopeBudget:
    """The budgets of one endpoint and account, shared by every worker."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        window = limits.window
        self.requests = TokenBucket(limits.rpm, window=window, now=now) if limits.rpm else None
        self.tokens = TokenBucket(limits.tpm, window=window, now=now) if limits.tpm else None
        start = limits.first_concurrency
        if limits.rpm:  # enough in flight to use the budget at the expected latency
            start = max(start, math.ceil(limits.rpm / window * EXPECTED_LATENCY))
        self.adaptive = (
            AdaptiveConcurrency(limits.concurrency, start=start) if limits.adaptive else None
        )
        self.holders: dict[str, _Holder] = {}
        self.paused_until = -math.inf
        #: the pause after a 429 without a delay: doubles while requests sent after one are
        #: refused again, back to `initial_backoff` once they are not
        self.backoff = limits.initial_backoff
        self.grants = 0
        self.rate_limited = 0
        self.waiting = 0
        self.changed = anyio.Event()

    @property
    def concurrency(self) -> int:
        return self.adaptive.limit if self.adaptive else self.limits.concurrency

    def slots_out(self) -> int:
        return sum(h.slots for h in self.holders.values())

    def wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def reap(self, now: float, lease_seconds: float) -> None:
        """Take back the slots of workers not heard from for `lease_seconds`."""
        dead = [w for w, h in self.holders.items() if now - h.seen > lease_seconds]
        for worker in dead:
            del self.holders[worker]
        if dead:
            self.wake()

    def settle(self, ask: Ask, now: float) -> None:
        if self.requests is not None and ask.permits_back:
            self.requests.give_back(ask.permits_back, now)
        if self.tokens is not None and ask.tokens_back:
            self.tokens.give_back(ask.tokens_back, now)
        if self.adaptive is not None:
            saturated = self.waiting > 0 or self.slots_out() + 1 >= self.concurrency
            for _ in range(ask.ok):
                self.adaptive.on_success(saturated=saturated, now=now, send_number=self.grants)
        if ask.permits_back or ask.tokens_back or ask.ok:
            self.wake()

    def wait_time(self, ask: Ask, holder: _Holder, now: float) -> float:
        delay = self.paused_until - now
        if ask.need_permit and self.requests is not None:
            delay = max(delay, self.requests.wait_time(1, now))
        if ask.need_tokens and self.tokens is not None:
            delay = max(delay, self.tokens.wait_time(ask.need_tokens, now))
        if ask.need_slot and holder.slots <= ask.in_flight:
            if self.slots_out() >= self.concurrency:
                delay = max(delay, math.inf)
        return delay

    def grant(self, ask: Ask, holder: _Holder, now: float) -> Grant:
        permits, tokens = 0, 0.0
        paused = self.paused_until > now
        if self.requests is not None and not paused:
            self.requests.refill(now)
            permits = max(0, min(ask.permits, int(self.requests.level + 1e-9)))
            if permits:
                self.requests.take(permits, now)
                self.grants += permits
        if self.tokens is not None and not paused:
            self.tokens.refill(now)
            want = max(ask.tokens, min(ask.need_tokens, self.tokens.capacity))
            tokens = max(0.0, min(want, self.tokens.level))
            if tokens:
                self.tokens.take(tokens, now)
        # slots: give up what is more than asked (never below what is in flight); take free
        # ones up to what is asked
        holder.slots = min(holder.slots, max(ask.slots, ask.in_flight))
        free = self.concurrency - self.slots_out()
        if ask.slots > holder.slots and free > 0:
            holder.slots += min(free, ask.slots - holder.slots)
        return Grant(permits, tokens, holder.slots, max(0.0, self.paused_until - now))

    def pause(self, seconds: float, now: float) -> None:
        if seconds > 0:
            self.paused_until = max(self.paused_until, now + seconds)


class BudgetActor:
    """The run's budgets, one per endpoint and account, and its spend cap; run as a named
    Ray actor (`start_budget`). Its methods are coroutines: calls that wait do not block
    the others."""

    def __init__(
        self,
        limits: Limits,
        *,
        max_cost: float | None,
        spent_usd: float,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.limits = limits
        self.lease_seconds = lease_seconds
        self.spend = SpendCap(max_cost, spent=spent_usd)
        #: an attempt's spend reservation is taken for spent at its worst once its
        #: attempt's time is up (its worker died without settling it)
        self.spend_hold = limits.timeout + limits.outage_timeout + LEASE_MARGIN
        self._spend_out: dict[str, dict[int, tuple[float, float]]] = {}
        self._spend_numbers = 0
        self._scopes: dict[str, _ScopeBudget] = {}

    def _scope(self, scope: str, now: float) -> _ScopeBudget:
        budget = self._scopes.get(scope)
        if budget is None:
            budget = self._scopes[scope] = _ScopeBudget(self.limits, now)
        return budget

    async def acquire(self, worker: str, scope: str, ask: Ask) -> Grant:
        """Settle what `ask` settles, wait (up to `LONG_POLL`) for what it needs, and grant
        what there is of what it wants."""
        now = time.monotonic()
        budget = self._scope(scope, now)
        budget.reap(now, self.lease_seconds)
        holder = budget.holders.get(worker)
        if holder is None:
            # new, or taken for dead and back: its requests in flight hold slots again
            holder = budget.holders[worker] = _Holder(slots=ask.in_flight)
        holder.seen = now
        budget.settle(ask, now)
        deadline = now + LONG_POLL
        budget.waiting += 1
        try:
            while True:
                delay = budget.wait_time(ask, holder, now)
                if delay <= 0 or now >= deadline:
                    break
                with anyio.move_on_after(min(delay, deadline - now)):
                    await budget.changed.wait()
                now = time.monotonic()
                holder.seen = now
                budget.reap(now, self.lease_seconds)
                budget.holders.setdefault(worker, holder)
        finally:
            budget.waiting -= 1
        return budget.grant(ask, holder, now)

    def forget(self, prefix: str) -> int:
        """Take back at once the slots of every worker whose name starts with `prefix` (the
        driver saw its actor die), rather than after `lease_seconds` of silence. Returns how
        many holders were forgotten."""
        forgotten = 0
        for budget in self._scopes.values():
            dead = [w for w in budget.holders if w.startswith(prefix)]
            for worker in dead:
                del budget.holders[worker]
            if dead:
                forgotten += len(dead)
                budget.wake()
        return forgotten

    def release(self, worker: str, scope: str, ask: Ask) -> None:
        """Settle `ask` and give back a worker's slots beyond `ask.slots` (never below what it
        has in flight); a worker left with none is forgotten."""
        now = time.monotonic()
        budget = self._scope(scope, now)
        budget.settle(ask, now)
        holder = budget.holders.get(worker)
        if holder is not None:
            holder.slots = min(holder.slots, max(ask.slots, ask.in_flight))
            holder.seen = now
            if holder.slots == 0:
                del budget.holders[worker]
        budget.wake()

    def rate_limited(
        self, worker: str, scope: str, *, retry_after: float | None, in_flight: int
    ) -> float:
        """A worker's 429: pause the scope (for Retry-After, else the fallback) and, without
        a delay, shrink the learned concurrency. Returns the pause's seconds left."""
        now = time.monotonic()
        budget = self._scope(scope, now)
        budget.rate_limited += 1
        if retry_after is not None:
            budget.pause(retry_after, now)
        elif now >= budget.paused_until:  # not one of the round the current pause answers
            if now < budget.paused_until + budget.backoff:  # refused again: a longer pause
                budget.backoff = min(budget.backoff * 2, self.limits.max_backoff)
            else:
                budget.backoff = self.limits.initial_backoff
            budget.pause(budget.backoff, now)
            adaptive = budget.adaptive
            if adaptive is not None and adaptive.on_rate_limited(
                in_flight_at_send=max(1, budget.slots_out()), send_number=budget.grants + 1
            ):
                adaptive.mark_shrink(budget.grants)
        budget.wake()
        return max(0.0, budget.paused_until - now)

    def follow_limit(self, scope: str, kind: str, limit: float) -> None:
        """A server's `x-ratelimit-limit-*` below the budget (`kind`: requests or tokens)
        lowers it for every worker."""
        now = time.monotonic()
        budget = self._scope(scope, now)
        bucket = budget.requests if kind == "requests" else budget.tokens
        if bucket is not None and 0 < limit < bucket.limit:
            bucket.set_limit(limit, now=now)

    def pause(self, scope: str, seconds: float) -> float:
        """Hold every request in `scope` for `seconds`; returns the pause's seconds left."""
        now = time.monotonic()
        budget = self._scope(scope, now)
        budget.pause(seconds, now)
        return max(0.0, budget.paused_until - now)

    async def spend_reserve(self, worker: str, worst: float) -> tuple[int, float]:
        """Wait (up to `LONG_POLL`) until `worst` fits under the cap; returns a reservation
        number (0: the cap is reached; -1: not yet, ask again) and the spend so far."""
        self._expire_spend(time.monotonic())
        with anyio.move_on_after(LONG_POLL):
            try:
                await self.spend.reserve(worst)
            except CostCapReached:
                return 0, self.spend.spent
            self._spend_numbers += 1
            number = self._spend_numbers
            self._spend_out.setdefault(worker, {})[number] = (worst, time.monotonic())
            return number, self.spend.spent
        return -1, self.spend.spent

    def spend_settle(self, worker: str, number: int, worst: float, actual: float | None) -> None:
        """Close a spend reservation with what it cost (an unknown one was expired)."""
        if self._spend_out.get(worker, {}).pop(number, None) is not None:
            self.spend.settle(worst, actual)

    def _expire_spend(self, now: float) -> None:
        for reservations in self._spend_out.values():
            for number, (worst, at) in list(reservations.items()):
                if now - at > self.spend_hold:
                    del reservations[number]
                    self.spend.settle(worst, worst)  # it may have been charged: count it

    def spend_state(self) -> tuple[float | None, float]:
        """The cap and the spend so far."""
        return self.spend.cap, self.spend.spent

    def statistics(self, scope: str) -> dict[str, Any]:
        """The scope's state, for tests and the driver's display."""
        now = time.monotonic()
        budget = self._scope(scope, now)
        return {
            "concurrency": budget.concurrency,
            "rpm_limit": budget.requests.limit if budget.requests else None,
            "slots_out": budget.slots_out(),
            "workers": len(budget.holders),
            "grants": budget.grants,
            "rate_limited": budget.rate_limited,
            "paused_for": max(0.0, budget.paused_until - now),
        }

    def scopes(self) -> list[str]:
        return sorted(self._scopes)


def scope_key(scope: Scope) -> str:
    """What a budget is kept per: the endpoint and the account (not the model: a sweep over
    two models shares the user's budgets, as in `LocalRateLimiter`)."""
    return f"{scope.endpoint}#{scope.key_digest}"


@dataclass(slots=True)
class _Stock:
    """What one worker holds of one scope's budget, and what it owes back."""

    permits: int = 0
    tokens: float = 0.0
    slots: int = 0
    in_flight: int = 0
    waiting: int = 0
    #: `anyio.current_time()` of the last call, and when the current chunk goes stale
    called_at: float = -math.inf
    #: `anyio.current_time()` of the last settlement sent without a grant
    flushed_at: float = -math.inf
    paused_until: float = -math.inf
    rate_limited: int = 0
    reserved_tokens: int = 0
    owed: Ask = field(default_factory=Ask)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


@dataclass(slots=True)
class _Held:
    key: str
    tokens: float  # tokens taken from the stock for this request
    reserved: int  # what the request was estimated at (for statistics)
    completion_cap: int


class LeasedRateLimiter:
    """A worker's `RateLimiter`: spends chunks leased from the run's `BudgetActor`.

    Args:
        handle: the actor.
        limits: the job's limits (the same the actor was started with).
        chunk: permits and tokens asked for at most in one call, in requests.
        refresh: seconds after which a worker calls again before sending (the longest
            another worker's 429 pause can go unnoticed; also renews its slots).
    """

    def __init__(
        self,
        handle: Any,
        limits: Limits,
        *,
        chunk: int = CHUNK,
        refresh: float = REFRESH,
        worker: str = "",
    ) -> None:
        self.handle = handle
        self.limits = limits
        self.chunk = chunk
        self.refresh = refresh
        #: how the actor knows this limiter's slots; `worker` is a prefix (the Ray actor's
        #: name) by which the driver can hand them back at once when that actor dies
        self.worker = f"{worker}/{uuid.uuid4().hex}"
        self.hold = limits.timeout + limits.outage_timeout + LEASE_MARGIN
        self._token_capacity = max(1.0, limits.tpm * BURST_SHARE) if limits.tpm else 0.0
        self._stocks: dict[str, _Stock] = {}
        self._held: dict[int, _Held] = {}
        self._numbers = 0
        self._completions = CompletionEstimate(limits.tpm_counts)
        #: server limits already reported, per scope key and kind
        self._followed: dict[tuple[str, str], float] = {}

    # -- the RateLimiter protocol -------------------------------------------------------------

    async def reserve(self, scope: Scope, *, prompt_tokens: int, completion_cap: int) -> Lease:
        key = scope_key(scope)
        stock = self._stocks.setdefault(key, _Stock())
        need = prompt_tokens + self._completions.allowance(completion_cap)
        stock.waiting += 1
        try:
            while not self._ready(stock, need):
                now = anyio.current_time()
                if stock.paused_until > now:
                    await anyio.sleep(stock.paused_until - now)
                    continue
                async with stock.lock:  # one call at a time; the others spend its answer
                    if not self._ready(stock, need):
                        await self._call(key, stock, need, wait=True)
        finally:
            stock.waiting -= 1
        taken = 0.0
        if self.limits.rpm:
            stock.permits -= 1
        if self.limits.tpm:
            taken = min(float(need), stock.tokens)
            stock.tokens -= taken
        stock.in_flight += 1
        stock.reserved_tokens += need
        self._numbers += 1
        self._held[self._numbers] = _Held(key, taken, need, completion_cap)
        if self._low(stock, need) and not stock.lock.locked():
            async with stock.lock:  # top up before the stock runs out
                await self._call(key, stock, need, wait=False)
        return Lease(scope, self._numbers, anyio.current_time() + self.hold)

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        held = self._held.pop(lease.number, None)
        if held is None:
            return
        stock = self._stocks[held.key]
        self._close(stock, held)
        owed, outcome = stock.owed, settlement.outcome
        if outcome is Outcome.RATE_LIMITED:
            # the server did not count a refused request: its permit and tokens come back
            owed.permits_back += 1 if self.limits.rpm else 0
            owed.tokens_back += held.tokens
            stock.rate_limited += 1
            seconds = await self.handle.rate_limited.remote(
                self.worker,
                held.key,
                retry_after=settlement.retry_after,
                in_flight=stock.in_flight,
            )
            stock.paused_until = anyio.current_time() + float(seconds)
        elif outcome is Outcome.OK:
            owed.ok += 1
            prompt_tokens, completion_tokens = (
                settlement.prompt_tokens,
                settlement.completion_tokens,
            )
            if completion_tokens is not None:
                self._completions.record(completion_tokens)
            if self.limits.tpm and prompt_tokens is not None:
                if self.limits.tpm_counts == "usage":
                    used = prompt_tokens + (completion_tokens or 0)
                else:
                    used = prompt_tokens + held.completion_cap
                owed.tokens_back += held.tokens - used
        if settlement.headers is not None:
            await self._follow_headers(held.key, stock, settlement.headers)
        self._settled(held.key, stock)

    async def cancel(self, lease: Lease) -> None:
        held = self._held.pop(lease.number, None)
        if held is None:
            return
        stock = self._stocks[held.key]
        self._close(stock, held)
        # nothing was sent: the permit and tokens stay with this worker for its next request
        stock.permits += 1 if self.limits.rpm else 0
        stock.tokens += held.tokens
        self._settled(held.key, stock)

    async def pause(self, scope: Scope, seconds: float) -> None:
        key = scope_key(scope)
        stock = self._stocks.setdefault(key, _Stock())
        left = await self.handle.pause.remote(key, seconds)
        stock.paused_until = anyio.current_time() + float(left)

    def statistics(self) -> LimiterStatistics:
        now = anyio.current_time()
        stocks = list(self._stocks.values())
        return LimiterStatistics(
            concurrency=sum(s.slots for s in stocks),
            in_flight=sum(s.in_flight for s in stocks),
            waiting=sum(s.waiting for s in stocks),
            paused_for=max([0.0, *(s.paused_until - now for s in stocks)]),
            rpm_limit=self.limits.rpm,
            tpm_limit=self.limits.tpm,
            rate_limited=sum(s.rate_limited for s in stocks),
            reserved_tokens=sum(s.reserved_tokens for s in stocks),
        )

    # -- the chunks ---------------------------------------------------------------------------

    def _ready(self, stock: _Stock, need: int) -> bool:
        now = anyio.current_time()
        if now < stock.paused_until or now - stock.called_at > self.refresh:
            return False
        if self.limits.rpm and stock.permits < 1:
            return False
        if self.limits.tpm and stock.tokens < min(float(need), self._token_capacity):
            return False
        return stock.in_flight < stock.slots

    def _low(self, stock: _Stock, need: int) -> bool:
        if self.limits.rpm and stock.permits < LOW_WATER:
            return True
        return bool(self.limits.tpm) and stock.tokens < LOW_WATER * need

    def _close(self, stock: _Stock, held: _Held) -> None:
        stock.in_flight -= 1
        stock.reserved_tokens -= held.reserved

    def _owed(self, stock: _Stock) -> Ask:
        owed, stock.owed = stock.owed, Ask()
        return owed

    async def _call(self, key: str, stock: _Stock, need: int, *, wait: bool) -> None:
        """Ask the actor for a chunk (settling what is owed); shielded, so that a granted
        chunk is never lost to a cancellation."""
        ask = self._owed(stock)
        want = min(self.chunk, stock.waiting + LOW_WATER)
        if self.limits.rpm:
            ask.permits = max(0, want - stock.permits)
            ask.need_permit = wait and stock.permits < 1
        if self.limits.tpm:
            ask.tokens = max(0.0, want * need - stock.tokens)
            if wait and stock.tokens < min(float(need), self._token_capacity):
                ask.need_tokens = float(need) - stock.tokens
        ask.slots = min(self.limits.concurrency, stock.in_flight + max(stock.waiting, 1))
        ask.need_slot = wait and stock.in_flight >= stock.slots
        ask.in_flight = stock.in_flight
        with anyio.CancelScope(shield=True):
            grant: Grant = await self.handle.acquire.remote(self.worker, key, ask)
        now = anyio.current_time()
        stock.permits += grant.permits
        stock.tokens += grant.tokens
        stock.slots = grant.slots
        stock.paused_until = now + grant.paused_for
        stock.called_at = now

    def _settled(self, key: str, stock: _Stock) -> None:
        """Send what is owed, without waiting for an answer: when the worker is idle (its
        slots, permits and tokens all go back), or when it has not called for `refresh`
        (its spare slots go back, for the workers that wait for them)."""
        now = anyio.current_time()
        idle = stock.in_flight == 0 and stock.waiting == 0
        if not idle and now - max(stock.called_at, stock.flushed_at) <= self.refresh:
            return
        ask = self._owed(stock)
        if idle:
            ask.permits_back += stock.permits
            ask.tokens_back += stock.tokens
            stock.permits, stock.tokens = 0, 0.0
            stock.called_at = -math.inf
        ask.slots = stock.in_flight + stock.waiting
        ask.in_flight = stock.in_flight
        stock.slots = min(stock.slots, ask.slots)
        stock.flushed_at = now
        self.handle.release.remote(self.worker, key, ask)

    async def _follow_headers(self, key: str, stock: _Stock, headers: Mapping[str, str]) -> None:
        """A server saying nothing is remaining pauses every worker until its reset, at once;
        a server limit below the budget lowers the budget."""
        for kind, configured in (("requests", self.limits.rpm), ("tokens", self.limits.tpm)):
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            followed = self._followed.get((key, kind), configured)
            if configured and limit and followed and limit < followed:
                self._followed[key, kind] = limit
                self.handle.follow_limit.remote(key, kind, limit)
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None or remaining.strip() not in ("0", "0.0"):
                continue
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
            if reset:
                left = await self.handle.pause.remote(key, reset)
                stock.paused_until = anyio.current_time() + float(left)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


class LeasedSpendCap:
    """A worker's spend cap: every reservation is the run's `BudgetActor`'s, so the cap
    holds across workers. Without a cap it calls nothing."""

    def __init__(self, handle: Any, *, cap: float | None, spent: float) -> None:
        self.handle = handle
        self.cap = cap
        self._spent = spent
        self.worker = uuid.uuid4().hex
        #: reservation numbers by worst case, oldest first (the meter settles by worst case)
        self._numbers: dict[float, deque[int]] = {}

    @property
    def spent(self) -> float:
        """The run's spend as of this worker's last reservation."""
        return self._spent

    async def reserve(self, worst: float) -> None:
        if self.cap is None:
            return
        while True:
            with anyio.CancelScope(shield=True):  # a reservation made is never lost
                number, spent = await self.handle.spend_reserve.remote(self.worker, worst)
            self._spent = float(spent)
            if number >= 0:
                break
            await anyio.lowlevel.checkpoint()  # a stop cancels between calls
        if not number:
            raise CostCapReached(spent=self._spent, cap=self.cap)
        self._numbers.setdefault(worst, deque()).append(int(number))

    def settle(self, worst: float, actual: float | None) -> None:
        if self.cap is None:
            return
        numbers = self._numbers.get(worst)
        if not numbers:
            return
        self._spent += actual or 0.0
        self.handle.spend_settle.remote(self.worker, numbers.popleft(), worst, actual)


# -- the contract with the engine -------------------------------------------------------------


def start_budget(
    limits: Limits,
    *,
    max_cost: float | None,
    spent_usd: float,
    name: str,
    lease_seconds: float = LEASE_SECONDS,
) -> Any:
    """Start the run's budget as a named actor (on the driver, once Ray is up); returns its
    handle, which workers pass to `worker_limiter` and `worker_spend_cap`.

    Args:
        spent_usd: what earlier runs of the job spent (from the checkpoints).
        name: the actor's name in the cluster; unique per run.
        lease_seconds: how long a silent worker's slots stay its own.
    """
    import ray  # lazy: ray is an optional extra

    # Any: ray's stubs do not follow a class through `ray.remote`
    actor: Any = ray.remote(BudgetActor)
    handle: Any = actor.options(name=name, num_cpus=0, max_concurrency=1000).remote(
        limits, max_cost=max_cost, spent_usd=spent_usd, lease_seconds=lease_seconds
    )
    ray.get(handle.scopes.remote())  # up and answering before any worker asks
    return handle


def worker_limiter(handle: Any, **options: Any) -> Callable[[Limits], RateLimiter]:
    """The `rate_limiter` factory for `run_job` in a worker (options: `LeasedRateLimiter`'s)."""

    def make(limits: Limits) -> RateLimiter:
        return LeasedRateLimiter(handle, limits, **options)

    return make


def worker_spend_cap(handle: Any) -> LeasedSpendCap:
    """The `spend_cap` for `run_job` in a worker. Blocks for one call to the actor, so call it
    outside the worker's event loop."""
    import ray

    cap, spent = ray.get(handle.spend_state.remote())
    return LeasedSpendCap(handle, cap=cap, spent=spent)


def stop_budget(handle: Any) -> None:
    """End the run's budget actor."""
    import ray

    ray.kill(handle)

"""The rate-limiter seam: the `RateLimiter` protocol the pool is written against, and the
local implementation behind it.

A limiter hands out leases: `reserve` waits until a request for a scope may go and returns a
`Lease`; the holder then either `settle`s it with what the attempt cost and how it ended, or
`cancel`s it when nothing was sent (its slot, request and tokens go back whole), from the
task that reserved it (a limiter that can, `ImmediateRateLimiter`, also does each without
an await when nothing waits). `settle`/`cancel` run under a shield (the caller's), so a lease is
never lost to a cancellation. A lease not closed by `expires_at` returns to the pool: the
attempt meter cuts short an attempt still running at its lease's expiry and closes the
lease (a local lease's holder is always alive, so it comes back by the holder's hand), and
a cluster-wide implementation also takes back by itself the leases of a worker that died.

A `Lease` is a plain value (scope, number, expiry) so that an implementation in another
process can hand it out; what it took stays on the implementation's side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import structlog

from batchrun.limits import Limiter, LimiterStatistics, Outcome, Reservation, Settlement

if TYPE_CHECKING:
    from batchrun.job import Limits

__all__ = [
    "ImmediateRateLimiter",
    "Lease",
    "LimiterStatistics",
    "LocalRateLimiter",
    "Outcome",
    "RateLimiter",
    "Scope",
    "Settlement",
    "key_digest",
]

log = structlog.get_logger("batchrun.ratelimit")

#: how long a local lease lives past the attempt's own bounds before its attempt is cut
#: short (a backstop: an attempt ends within them)
LEASE_MARGIN = 60.0


def key_digest(api_key: str | None) -> str:
    """A short digest naming an API key in a scope; the key itself never leaves `client`."""
    if not api_key:
        return ""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Scope:
    """What a budget belongs to: one endpoint, one account (a digest of its key), one model.

    Servers keep their limits per account (DeepSeek) or per account and model (OpenAI); a
    limiter decides which parts of a scope it keeps budgets for.
    """

    endpoint: str
    key_digest: str
    model: str


@dataclass(slots=True)
class Lease:
    """One attempt's permission to send: settle it, or cancel it if nothing was sent.

    A value, never changed once made; not a frozen dataclass only because one is made per
    attempt and a frozen one costs several times as much to make (issue 12)."""

    scope: Scope
    number: int
    #: `anyio.current_time()` after which the limiter takes it back unsettled
    expires_at: float


class RateLimiter(Protocol):
    """What the pool needs from a limiter; a cluster-wide limiter implements the same."""

    async def reserve(self, scope: Scope, *, prompt_tokens: int, completion_cap: int) -> Lease:
        """Wait until a request in `scope` may be sent; cancelling the wait takes nothing."""
        ...

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        """Close a lease whose request was sent, with what it cost and how it ended."""
        ...

    async def cancel(self, lease: Lease) -> None:
        """Close a lease whose request was never sent: everything it took goes back."""
        ...

    async def pause(self, scope: Scope, seconds: float) -> None:
        """Hold every request in `scope` for `seconds`."""
        ...

    def statistics(self) -> LimiterStatistics:
        """A snapshot for progress displays and tests (never waits). The pool also starts
        its workers from `concurrency` (how many requests may go at once now; a few more
        workers than that, up to the job's ceiling, as it grows), polled every few ms: it
        must be cheap, and a limiter that does not know one reports 0 (the pool then
        starts the job's whole `concurrency` at once)."""
        ...


@runtime_checkable
class ImmediateRateLimiter(RateLimiter, Protocol):
    """A limiter that can also act without awaiting (`LocalRateLimiter`). The attempt meter
    checks for these methods once per run (`isinstance`), then calls `try_reserve` first
    where `reserves_at_once`, and `settle_now`/`cancel_now` instead of `settle`/`cancel`
    where `settles_at_once`: no coroutine, no shield. A limiter with the flags but not the
    methods takes the awaited path. (A subclass of `LocalRateLimiter` that overrides
    `reserve`, `settle` or `cancel` without its `_now` version loses the flag for it.)"""

    reserves_at_once: bool
    settles_at_once: bool

    def try_reserve(
        self, scope: Scope, *, prompt_tokens: int, completion_cap: int, now: float
    ) -> Lease | None:
        """A lease if one may be had without waiting, else None (nothing taken). `now`:
        `anyio.current_time()`."""
        ...

    def settle_now(self, lease: Lease, settlement: Settlement, now: float | None = None) -> None:
        """`settle`, without a wait."""
        ...

    def cancel_now(self, lease: Lease, now: float | None = None) -> None:
        """`cancel`, without a wait."""
        ...


class LocalRateLimiter:
    """The limiter of one process: every scope shares one `limits.Limiter`.

    One shared `Limiter` rather than one per scope, because a run talks to one endpoint
    with one key, and the user's `concurrency`, `rpm` and `tpm` are budgets of the run: a
    sweep over two models must not double them. (DeepSeek, our first server, also keeps its
    limits per account, not per model.) A cluster-wide limiter may split by scope.

    Args:
        limiter: the budgets.
        lease_seconds: how long after its reservation a lease expires (the meter then cuts
            its attempt short).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass's own `reserve`, `settle` or `cancel` (which may await, or do more)
        # must run: the meter must not call the `_now` version it did not write instead
        for flag, pairs in _AT_ONCE.items():
            if any(_overrides(cls, awaited) and not _overrides(cls, now) for awaited, now in pairs):
                setattr(cls, flag, False)

    #: `try_reserve` is `reserve` without the wait: the attempt meter calls it first
    reserves_at_once: bool = True
    #: `settle` and `cancel` never suspend: the attempt meter calls `settle_now` and
    #: `cancel_now` instead, without a shield
    settles_at_once: bool = True

    def __init__(self, limiter: Limiter, *, lease_seconds: float) -> None:
        self.limiter = limiter
        self.lease_seconds = lease_seconds
        self._leases: dict[int, Reservation] = {}
        self._numbers = 0

    @classmethod
    def for_limits(cls, limits: Limits) -> LocalRateLimiter:
        """The local limiter of a job's `Limits`."""
        limiter = Limiter(
            concurrency=limits.concurrency,
            rpm=limits.rpm,
            tpm=limits.tpm,
            window=limits.window,
            adaptive=limits.adaptive,
            tpm_counts=limits.tpm_counts,
            start_concurrency=limits.first_concurrency,
            fallback_pause=limits.initial_backoff,
            max_pause=limits.max_backoff,
        )
        # an attempt holds its lease for at most `timeout` per request, and while the
        # endpoint is down for at most `outage_timeout` more
        hold = limits.timeout + limits.outage_timeout + LEASE_MARGIN
        return cls(limiter, lease_seconds=hold)

    async def reserve(self, scope: Scope, *, prompt_tokens: int, completion_cap: int) -> Lease:
        reservation = await self.limiter.reserve(
            prompt_tokens=prompt_tokens, completion_cap=completion_cap
        )
        return self._lease(scope, reservation, anyio.current_time())

    def try_reserve(
        self, scope: Scope, *, prompt_tokens: int, completion_cap: int, now: float
    ) -> Lease | None:
        """`reserve` if it need not wait (`Limiter.try_reserve`), else None: nothing taken."""
        reservation = self.limiter.try_reserve(
            prompt_tokens=prompt_tokens, completion_cap=completion_cap, now=now
        )
        return None if reservation is None else self._lease(scope, reservation, now)

    def _lease(self, scope: Scope, reservation: Reservation, now: float) -> Lease:
        self._numbers += 1
        self._leases[self._numbers] = reservation
        return Lease(scope, self._numbers, now + self.lease_seconds)

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        self.settle_now(lease, settlement)

    def settle_now(self, lease: Lease, settlement: Settlement, now: float | None = None) -> None:
        """`settle`, which never waits; `now`: `anyio.current_time()`, if read."""
        reservation = self._leases.pop(lease.number, None)
        if reservation is not None:  # else closed already
            self.limiter.settle(reservation, settlement, now=now)

    async def cancel(self, lease: Lease) -> None:
        self.cancel_now(lease)

    def cancel_now(self, lease: Lease, now: float | None = None) -> None:
        """`cancel`, which never waits."""
        reservation = self._leases.pop(lease.number, None)
        if reservation is not None:
            self.limiter.cancel(reservation, now=now)

    async def pause(self, scope: Scope, seconds: float) -> None:
        self.limiter.pause(seconds)

    def statistics(self) -> LimiterStatistics:
        return self.limiter.statistics()


#: the flags of `LocalRateLimiter`'s fast path, each with the awaited methods it replaces and
#: their `_now` versions
_AT_ONCE = {
    "reserves_at_once": (("reserve", "try_reserve"),),
    "settles_at_once": (("settle", "settle_now"), ("cancel", "cancel_now")),
}


def _overrides(cls: type, name: str) -> bool:
    """Whether `cls` has its own `name` rather than `LocalRateLimiter`'s."""
    return bool(getattr(cls, name) is not getattr(LocalRateLimiter, name))

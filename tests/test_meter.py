"""The attempt meter: every attempt's lease and spend are closed, however the attempt ends."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from batchrun.client import Completion
from batchrun.errors import LeaseExpired, RateLimited
from batchrun.limits import Limiter, LimiterStatistics, Settlement, SpendCap
from batchrun.meter import AttemptMeter
from batchrun.prices import PriceTable
from batchrun.ratelimit import Lease, LocalRateLimiter, Scope

TRIO = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio")]
)
BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hello"}]}


def make_meter(*, rpm: float | None = None, cap: float | None = None) -> AttemptMeter:
    local = LocalRateLimiter(Limiter(concurrency=2, rpm=rpm, adaptive=False), lease_seconds=5.0)
    return AttemptMeter(
        limiter=local, spend=SpendCap(cap), prices=PriceTable.load(), endpoint="http://x"
    )


@TRIO
async def test_an_attempt_outliving_its_lease_is_cut_short(anyio_backend: object) -> None:
    """An attempt still running at its lease's expiry is cancelled and its lease closed."""
    meter = make_meter()
    start = anyio.current_time()
    with pytest.raises(LeaseExpired):
        async with meter.attempt(meter.request(BODY)) as attempt:
            attempt.sending()
            await anyio.sleep(100.0)
    assert anyio.current_time() - start == pytest.approx(5.0)
    assert meter.limiter.statistics().in_flight == 0


@TRIO
async def test_a_cancelled_attempt_is_settled(anyio_backend: object) -> None:
    """An attempt cancelled mid-request gives back its slot and its spend reservation."""
    meter = make_meter(cap=1.0)
    with anyio.move_on_after(1.0):
        async with meter.attempt(meter.request(BODY)) as attempt:
            attempt.sending()
            await anyio.sleep(10.0)
    assert meter.limiter.statistics().in_flight == 0
    assert meter.spend.in_flight == 0.0 and attempt.seconds > 0


@TRIO
async def test_an_attempt_stopped_before_sending_gives_back_its_request(
    anyio_backend: object,
) -> None:
    """An attempt that sent nothing cancels its lease: the RPM bucket has its request back,
    so the next attempt goes at once."""
    meter = make_meter(rpm=60)
    request = meter.request(BODY)
    with pytest.raises(RuntimeError):
        async with meter.attempt(request):
            raise RuntimeError("stopped before sending")
    start = anyio.current_time()
    async with meter.attempt(request) as attempt:
        attempt.sending()
    assert anyio.current_time() == start and meter.limiter.statistics().in_flight == 0


class _SlowSettling(LocalRateLimiter):
    """A limiter whose settle waits (as a cluster-wide one does)."""

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        await anyio.sleep(0.5)
        await super().settle(lease, settlement)


@TRIO
async def test_a_settle_that_waits_is_shielded_from_the_cancellation(
    anyio_backend: object,
) -> None:
    """A limiter whose settle suspends still gets the lease of a cancelled attempt back."""
    local = _SlowSettling(Limiter(concurrency=2, adaptive=False), lease_seconds=5.0)
    assert not local.settles_at_once  # a subclass is not taken to settle at once
    meter = AttemptMeter(
        limiter=local, spend=SpendCap(None), prices=PriceTable.load(), endpoint="http://x"
    )
    with anyio.move_on_after(1.0):
        async with meter.attempt(meter.request(BODY)) as attempt:
            attempt.sending()
            await anyio.sleep(10.0)
    assert local.statistics().in_flight == 0


def _at_once(step: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must finish without suspending; its result."""
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    raise AssertionError("it suspended")


def _answer() -> Completion:
    return Completion("hi", None, "stop", "deepseek-chat", "id", 200, 3, 2, headers={})


@pytest.mark.anyio
async def test_a_common_attempt_takes_and_settles_its_lease_without_an_await() -> None:
    """With budget at hand, no spend cap and no schedule, entering and leaving an attempt
    neither suspends nor enters a cancel scope (the fast path, issue 12)."""
    meter = make_meter()
    assert meter.reserve_now is not None
    attempt = meter.attempt(meter.request(BODY), deferred_deadline=True)
    assert _at_once(attempt.__aenter__()) is attempt
    assert attempt.lease is not None and attempt._deadline is None
    assert meter.limiter.statistics().in_flight == 1
    attempt.sending()
    attempt.received(_answer())
    _at_once(attempt.__aexit__(None, None, None))
    assert meter.limiter.statistics().in_flight == 0
    assert attempt.charge is not None and attempt.charge.usd is not None


@TRIO
async def test_an_attempt_waits_its_turn_behind_a_held_slot(anyio_backend: object) -> None:
    """With every slot held, an attempt takes the awaited path and goes once one is back."""
    meter = make_meter()  # two slots
    went: list[tuple[str, float]] = []
    release = [anyio.Event(), anyio.Event()]

    async def hold(number: int) -> None:
        async with meter.attempt(meter.request(BODY), deferred_deadline=True):
            went.append((f"held {number}", anyio.current_time()))
            await release[number].wait()

    async def third() -> None:
        assert meter.limiter.limiter.try_reserve(prompt_tokens=1, completion_cap=1, now=0.0) is None
        async with meter.attempt(meter.request(BODY), deferred_deadline=True):
            went.append(("third", anyio.current_time()))

    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        group.start_soon(hold, 0)
        group.start_soon(hold, 1)
        await anyio.sleep(1.0)
        group.start_soon(third)
        await anyio.sleep(2.0)
        assert sorted(name for name, _ in went) == ["held 0", "held 1"]
        release[0].set()
        release[1].set()
    assert went[2] == ("third", start + 3.0)
    assert meter.limiter.statistics().in_flight == 0


@TRIO
async def test_a_paced_attempt_takes_the_awaited_path(anyio_backend: object) -> None:
    """An empty RPM bucket makes an attempt wait for its pace."""
    paced = make_meter(rpm=60)
    start = anyio.current_time()
    for _ in range(3):
        async with paced.attempt(paced.request(BODY), deferred_deadline=True) as attempt:
            attempt.sending()
    assert anyio.current_time() - start >= 1.0  # the bucket holds one request: paced after it


@TRIO
async def test_a_spend_cap_with_room_takes_the_fast_path(anyio_backend: object) -> None:
    """Under a local spend cap, an attempt that fits reserves without an await; one that
    fits only once the request in flight is settled waits for it (the awaited path)."""
    worst = make_meter(cap=1.0).request(BODY).worst_usd
    meter = make_meter(cap=worst * 1.5)
    first = meter.attempt(meter.request(BODY), deferred_deadline=True)
    assert _at_once(first.__aenter__()) is first
    went: list[float] = []

    async def second() -> None:
        async with meter.attempt(meter.request(BODY), deferred_deadline=True):
            went.append(anyio.current_time())

    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        group.start_soon(second)
        await anyio.sleep(2.0)
        assert not went and meter.limiter.statistics().in_flight == 1
        await first.__aexit__(None, None, None)  # nothing sent: the reservation goes back
    assert went == [start + 2.0]
    assert meter.spend.in_flight == 0.0


@TRIO
async def test_a_deferred_deadline_cuts_short_only_under_attempt_deadline(
    anyio_backend: object,
) -> None:
    """An attempt with a deferred deadline is cut short at its lease's expiry where its block
    waits under `attempt.deadline()` (the pool's sends after a failure, or any send that may
    outlive the lease), with `LeaseExpired`, and its lease comes back."""
    meter = make_meter()  # 5 s leases
    start = anyio.current_time()
    with pytest.raises(LeaseExpired):
        async with meter.attempt(meter.request(BODY), deferred_deadline=True) as attempt:
            attempt.sending()
            assert attempt.outlasts(3.0) and not attempt.outlasts(10.0)
            await anyio.sleep(1.0)  # known to end in time: no deadline
            with attempt.deadline():
                await anyio.sleep(100.0)
    assert anyio.current_time() - start == pytest.approx(5.0)
    assert meter.limiter.statistics().in_flight == 0


class _FlagsOnly:
    """A limiter passed in (`rate_limiter=`) that sets `settles_at_once` and
    `reserves_at_once` but has no `try_reserve`, `settle_now` or `cancel_now`: all awaited."""

    settles_at_once = True
    reserves_at_once = True

    def __init__(self) -> None:
        self.inner = LocalRateLimiter(Limiter(concurrency=2, adaptive=False), lease_seconds=5.0)

    async def reserve(self, scope: Scope, *, prompt_tokens: int, completion_cap: int) -> Lease:
        return await self.inner.reserve(
            scope, prompt_tokens=prompt_tokens, completion_cap=completion_cap
        )

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        await self.inner.settle(lease, settlement)

    async def cancel(self, lease: Lease) -> None:
        await self.inner.cancel(lease)

    async def pause(self, scope: Scope, seconds: float) -> None:
        await self.inner.pause(scope, seconds)

    def statistics(self) -> LimiterStatistics:
        return self.inner.statistics()


@pytest.mark.anyio
async def test_a_limiter_with_the_flags_but_not_the_methods_takes_the_awaited_path() -> None:
    """The fast path is chosen from the methods a limiter has, not from its flags: one
    without `settle_now` has its `settle` awaited, its lease closed and the spend cap
    settled once."""
    limiter = _FlagsOnly()
    meter = AttemptMeter(
        limiter=limiter, spend=SpendCap(100.0), prices=PriceTable.load(), endpoint="http://x"
    )
    assert meter.reserve_now is None and not meter.settles_at_once
    async with meter.attempt(meter.request(BODY), deferred_deadline=True) as attempt:
        attempt.sending()
        attempt.received(_answer())
    assert not limiter.inner._leases and limiter.statistics().in_flight == 0
    assert meter.spend.in_flight == 0.0 and meter.spend.spent > 0


class _CountingSettle(LocalRateLimiter):
    """A subclass that overrides the awaited `settle` and `cancel` only (and claims the fast
    path): its own methods must run."""

    settles_at_once = True

    def __init__(self, limiter: Limiter, *, lease_seconds: float) -> None:
        super().__init__(limiter, lease_seconds=lease_seconds)
        self.closed: list[str] = []

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        self.closed.append("settle")
        await super().settle(lease, settlement)

    async def cancel(self, lease: Lease) -> None:
        self.closed.append("cancel")
        await super().cancel(lease)


class _Plain(LocalRateLimiter):
    """A subclass that overrides none of the limiter's methods."""


@pytest.mark.anyio
async def test_a_subclass_overriding_settle_has_its_settle_run() -> None:
    """A `LocalRateLimiter` subclass whose `settle`/`cancel` are its own loses the settling
    fast path (its methods run); one that overrides nothing keeps both fast paths."""
    assert not _CountingSettle.settles_at_once and _CountingSettle.reserves_at_once
    assert _Plain.settles_at_once and _Plain.reserves_at_once
    local = _CountingSettle(Limiter(concurrency=2, adaptive=False), lease_seconds=5.0)
    meter = AttemptMeter(
        limiter=local, spend=SpendCap(None), prices=PriceTable.load(), endpoint="http://x"
    )
    request = meter.request(BODY)
    async with meter.attempt(request, deferred_deadline=True) as attempt:
        attempt.sending()
        attempt.received(_answer())
    async with meter.attempt(request, deferred_deadline=True):
        pass  # nothing sent
    assert local.closed == ["settle", "cancel"] and not local._leases


@TRIO
async def test_a_refused_fast_path_gives_back_its_spend_reservation(
    anyio_backend: object,
) -> None:
    """With a spend cap and both slots held, a third attempt reserves its spend at once,
    is refused by the limiter, gives the spend back and waits (the awaited path takes it
    again); it runs when a slot frees, and at the end the cap holds nothing in flight."""
    meter = make_meter(cap=100.0)  # 2 slots
    request = meter.request(BODY)
    worst = request.worst_usd
    assert worst > 0 and meter.reserve_now is not None
    release = anyio.Event()
    went: list[str] = []

    async def hold(name: str) -> None:
        async with meter.attempt(request, deferred_deadline=True) as attempt:
            attempt.sending()
            went.append(name)
            await release.wait()
            attempt.received(_answer())

    async with anyio.create_task_group() as group:
        group.start_soon(hold, "first")
        group.start_soon(hold, "second")
        await anyio.wait_all_tasks_blocked()
        group.start_soon(hold, "third")
        await anyio.wait_all_tasks_blocked()
        assert sorted(went) == ["first", "second"]  # trio shuffles its run queue
        # two in flight and the third's one reservation while it waits for a slot
        assert meter.spend.in_flight == pytest.approx(3 * worst)
        release.set()
    assert len(went) == 3 and went[-1] == "third"
    assert meter.spend._requests == 0 and meter.spend.in_flight == pytest.approx(0.0, abs=1e-12)
    assert meter.limiter.statistics().in_flight == 0


class _RaisingReserve(LocalRateLimiter):
    """A limiter whose `try_reserve` raises (a bug, or a cancellation from within)."""

    def try_reserve(
        self, scope: Scope, *, prompt_tokens: int, completion_cap: int, now: float
    ) -> Lease | None:
        raise RuntimeError("try_reserve failed")


@pytest.mark.anyio
async def test_a_fast_reserve_that_raises_gives_back_the_spend_reservation() -> None:
    """If the limiter's `try_reserve` raises after the spend cap reserved, the spend
    reservation goes back (as on the awaited path)."""
    local = _RaisingReserve(Limiter(concurrency=2, adaptive=False), lease_seconds=5.0)
    meter = AttemptMeter(
        limiter=local, spend=SpendCap(100.0), prices=PriceTable.load(), endpoint="http://x"
    )
    assert meter.reserve_now is not None
    with pytest.raises(RuntimeError, match="try_reserve failed"):
        async with meter.attempt(meter.request(BODY), deferred_deadline=True):
            pass
    assert meter.spend.in_flight == 0.0 and meter.spend._requests == 0


@pytest.mark.anyio
async def test_an_answered_attempt_settles_by_the_answered_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer is settled straight through (`_settle_answered`, issue 12), not through
    `_account`; the limiter still learns its usage and the spend cap its charge."""
    meter = make_meter(cap=10.0)
    monkeypatch.setattr(meter, "_account", None)  # any call to it fails
    attempt = meter.attempt(meter.request(BODY), deferred_deadline=True)
    async with attempt:
        attempt.sending()
        attempt.received(_answer())
    assert meter.limiter.statistics().in_flight == 0
    assert attempt.charge is not None and attempt.charge.usd is not None
    assert meter.spend.spent == pytest.approx(attempt.charge.usd)
    assert attempt.seconds > 0 and meter.answering(1.0)


@pytest.mark.anyio
async def test_a_refused_attempt_still_takes_the_accounting_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 429 (no answer) is no answered attempt: `_account` settles it, and its pause holds."""
    meter = make_meter()
    accounted: list[BaseException | None] = []
    account = meter._account

    def spy(attempt: Any, error: BaseException | None, now: float) -> Settlement | None:
        accounted.append(error)
        return account(attempt, error, now)

    monkeypatch.setattr(meter, "_account", spy)
    with pytest.raises(RateLimited):
        async with meter.attempt(meter.request(BODY), deferred_deadline=True) as attempt:
            attempt.sending()
            raise RateLimited("429", retry_after=30.0)
    assert len(accounted) == 1 and isinstance(accounted[0], RateLimited)
    statistics = meter.limiter.statistics()
    assert statistics.in_flight == 0 and statistics.rate_limited == 1
    assert statistics.paused_for > 29

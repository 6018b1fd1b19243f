"""The attempt meter: every attempt's lease and spend are closed, however the attempt ends."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from batchrun.client import Completion
from batchrun.errors import LeaseExpired
from batchrun.limits import Limiter, Settlement, SpendCap
from batchrun.meter import AttemptMeter
from batchrun.prices import PriceTable
from batchrun.ratelimit import Lease, LocalRateLimiter

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

"""The attempt meter: every attempt's lease and spend are closed, however the attempt ends."""

from __future__ import annotations

import anyio
import pytest
from trio.testing import MockClock

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

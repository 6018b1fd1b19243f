"""The wall clock a run reads: what time a request is sent (its price) and how long to wait
for off-peak. One `Clock` is injected per run (`PoolSettings.clock`), so tests can set the
time of day; elapsed time and timeouts keep using the event loop's clock
(`anyio.current_time()`, or `loop_clock()`: the same clock, read cheaply).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import anyio

from batchrun.epoch import epoch_us

#: how long the system clock sleeps at a time before reading the wall clock again (a
#: suspended laptop or a clock step must not make a wait of hours overshoot)
_SLEEP_CHUNK_S = 60.0


class Clock(Protocol):
    """Tells the time in UTC, and sleeps until a time."""

    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...

    async def sleep_until(self, when: datetime, *, wake: anyio.Event | None = None) -> None:
        """Return at `when`, or as soon as `wake` is set."""
        ...


class SystemClock:
    """The machine's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime, *, wake: anyio.Event | None = None) -> None:
        while not (wake is not None and wake.is_set()):
            left = (when - self.now()).total_seconds()
            if left <= 0:
                return
            with anyio.move_on_after(min(left, _SLEEP_CHUNK_S)):
                await (anyio.sleep_forever() if wake is None else wake.wait())


SYSTEM_CLOCK = SystemClock()


def epoch_us_reader(clock: Clock) -> Callable[[], int]:
    """How a run reads its clock as epoch microseconds (`epoch_us(clock.now())`): the
    machine's clock as an int from `time.time_ns`, with no `datetime` made only to be
    turned into this number (two a request: issue 12); an injected clock (tests set the
    time of day) is asked as ever."""
    if clock is SYSTEM_CLOCK:
        return _system_epoch_us
    return lambda: epoch_us(clock.now())


def _system_epoch_us() -> int:
    return time.time_ns() // 1000


def loop_clock() -> Callable[[], float]:
    """The running event loop's clock as a plain function: what `anyio.current_time()`
    returns, without its look-up of the backend on every call (about a microsecond each,
    several a request: issue 12). Call it inside the loop; the function serves that loop."""
    try:
        return asyncio.get_running_loop().time  # anyio's asyncio backend reads this clock
    except RuntimeError:  # another backend (trio): ask anyio each time
        return anyio.current_time

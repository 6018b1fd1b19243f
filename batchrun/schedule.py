"""Off-peak runs (`schedule = "off-peak"`): a request waits while its model is at peak price.

The price table says what is peak (`prices.Price.is_peak`); this module works out when a
model's off-peak begins, waits for it on the run's `Clock`, says so once per window in the
log, and keeps the note the progress display shows. A model without peak prices (a
reseller's, an old DeepSeek one) never waits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
import structlog

from batchrun.clock import Clock
from batchrun.prices import PeakHours, PriceTable
from batchrun.progress import Tally

log = structlog.get_logger("batchrun")

#: the schedule names, as the job key `schedule` spells them
ANYTIME = "anytime"
OFF_PEAK = "off-peak"
#: peak windows chained back to back are crossed in at most this many steps
_MAX_STEPS = 64


@dataclass(frozen=True, slots=True)
class PeakWait:
    """A model at its peak price: when its off-peak begins, and what off-peak saves."""

    until: datetime
    #: the share of the cost saved off-peak (0.5: half price)
    saving: float

    def note(self, now: datetime) -> str:
        """'waiting for off-peak until 10:00 UTC (saves 50%)'"""
        day = "" if self.until.date() == now.date() else f" on {self.until:%a %d %b}"
        return f"waiting for off-peak until {self.until:%H:%M} UTC{day} (saves {self.saving:.0%})"


def peak_wait(prices: PriceTable, model: str, at: datetime) -> PeakWait | None:
    """If `model` is at its peak price at `at`: when off-peak begins; else None."""
    span = prices.in_force(model, at)  # the common answer, off-peak, without a calendar
    if span is None or not span.peak:
        return None
    saving, until = span.price.off_peak_saving(), at
    for _ in range(_MAX_STEPS):
        price = prices.price_for(model, until)
        if price is None or price.peak_hours is None or not price.is_peak(until):
            break
        change = price.peak_hours.next_change(until)
        if change is None:  # peak with no end in sight: a calendar of whole days, say
            break
        until = change
    return PeakWait(until, saving)


class OffPeakSchedule:
    """Holds each request back while its model is at peak price, until off-peak begins.

    Args:
        stop: set when the run stops; waits return at once (nothing is sent after a stop).
        tally: the run's counters; `tally.waiting` carries the note while requests wait.
    """

    def __init__(self, prices: PriceTable, *, clock: Clock, stop: anyio.Event, tally: Tally):
        self.prices = prices
        self.clock = clock
        self._stop = stop
        self._tally = tally
        self._waiting = 0
        #: the end of the window last announced in the log (once a window, not per request)
        self._announced: datetime | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def at_peak(self, model: str, at: datetime) -> bool:
        """Whether `model` is at its peak price at `at`."""
        span = self.prices.in_force(model, at)
        return span is not None and span.peak

    async def wait_off_peak(self, model: str) -> bool:
        """Return once `model` is off-peak (at once if it is), or when the run stops: whether
        the request was held back."""
        waited = False
        while not self._stop.is_set():
            now = self.clock.now()
            wait = peak_wait(self.prices, model, now)
            if wait is None:
                if waited and self._waiting == 0:  # the last request held back goes
                    log.info("off_peak_resumed", model=model, at=now.isoformat())
                return waited
            note = wait.note(now)
            if self._announced != wait.until:
                self._announced = wait.until
                log.info("off_peak_wait", note=note, model=model, until=wait.until.isoformat())
            self._waiting += 1
            self._tally.waiting = note
            waited = True
            try:
                await self.clock.sleep_until(wait.until, wake=self._stop)
            finally:
                self._waiting -= 1
                if self._waiting == 0:
                    self._tally.waiting = None
        return waited


def peak_calendars(prices: PriceTable, models: Iterable[str], at: datetime) -> list[PeakHours]:
    """The distinct peak-hour calendars of `models`' prices in force at `at`."""
    found: dict[str, PeakHours] = {}
    for model in models:
        price = prices.price_for(model, at)
        if price is not None and price.peak_hours is not None:
            found.setdefault(price.peak_hours.name, price.peak_hours)
    return list(found.values())


def first_off_peak(calendars: list[PeakHours], at: datetime) -> datetime:
    """The first moment from `at` on when no calendar is at peak."""
    for _ in range(_MAX_STEPS):
        ends = [c.next_change(at) for c in calendars if c.is_peak(at)]
        if not ends or None in ends:
            return at
        at = max(e for e in ends if e is not None)
    return at


def off_peak_finish(calendars: list[PeakHours], start: datetime, sending: timedelta) -> datetime:
    """When a run that needs `sending` of sending time ends if it sends only while no
    calendar is at peak (the off-peak schedule for a job's models), starting at `start`."""
    at, left = start, sending
    while True:
        at = first_off_peak(calendars, at)
        starts = [c.next_change(at) for c in calendars]
        following = min((s for s in starts if s is not None), default=None)
        if following is None or following - at >= left:
            return at + left
        left -= following - at
        at = following

"""What a row cost: its usage times the price in force when it was sent.

Prices live in a data file shipped in the package (`data/prices.toml`); a user file in the
same shape adds models or overrides entries. An unknown model costs None, with one warning,
never a made-up number.

A price may have peak and off-peak rates: its `peak_hours` name a weekly calendar of UTC
windows (`[peak.NAME]`: days, windows, holidays), and outside those windows its
`off_peak_prices` apply. A user file's `[peak.NAME]` keys replace the shipped ones, which is how
a user gives the year's holidays. Which rate is in force is decided here and nowhere else: the
meter prices a row by it, and the off-peak schedule waits by it.

Every cost is in USD (`CURRENCY`): `cost_usd` and `--max-cost` are sums of one currency, so a
price file in another currency is refused rather than converted or added to them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from batchrun.epoch import epoch_us, from_epoch_us
from batchrun.errors import ConfigError

log = structlog.get_logger("batchrun.prices")

PER_TOKENS = 1_000_000
#: the currency of `cost_usd` and `--max-cost`; a price in any other is refused
CURRENCY = "USD"


@dataclass(frozen=True, slots=True)
class OffPeak:
    """A discount for requests sent in a daily UTC window (which may wrap midnight)."""

    start: time
    end: time
    discount: float
    since: datetime

    def applies(self, at: datetime) -> bool:
        if at < self.since:
            return False
        now = at.astimezone(UTC).time()
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def next_change(self, at: datetime) -> datetime:
        """The first instant after `at` where `applies` may change: its start, or the next
        daily start or end."""
        if at < self.since:
            return self.since
        utc = at.astimezone(UTC)
        midnight = datetime(utc.year, utc.month, utc.day, tzinfo=UTC)
        marks = (
            midnight
            + timedelta(days=day, hours=t.hour, minutes=t.minute, seconds=t.second)
            + timedelta(microseconds=t.microsecond)
            for day in (0, 1)
            for t in (self.start, self.end)
        )
        return min(mark for mark in marks if mark > at)


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: how far ahead the calendar looks for a change (a year of holidays cannot hide one)
_HORIZON_DAYS = 400


def _hhmm(offset: timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True, slots=True)
class PeakHours:
    """A weekly calendar of peak windows in UTC: on its `days`, except `holidays`, the
    `windows` are peak and every other instant is off-peak."""

    name: str
    #: weekday numbers, Monday 0
    days: frozenset[int]
    #: (start, end) offsets from midnight UTC, start < end <= 24 h
    windows: tuple[tuple[timedelta, timedelta], ...]
    holidays: frozenset[date]

    def _intervals(self, first: date) -> Iterator[tuple[datetime, datetime]]:
        """Peak intervals from `first` on, in order, adjacent ones merged."""
        pending: tuple[datetime, datetime] | None = None
        for offset in range(_HORIZON_DAYS):
            day = first + timedelta(days=offset)
            if day.weekday() not in self.days or day in self.holidays:
                continue
            midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
            for start, end in self.windows:
                begin, finish = midnight + start, midnight + end
                if pending is not None and begin <= pending[1]:
                    pending = (pending[0], max(pending[1], finish))
                    continue
                if pending is not None:
                    yield pending
                pending = (begin, finish)
        if pending is not None:
            yield pending

    def _around(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        at = at.astimezone(UTC)
        start = at.date() - timedelta(days=1)  # a merged window may begin the day before
        return (iv for iv in self._intervals(start) if iv[1] > at)

    def __str__(self) -> str:
        """'01:00-04:00, 06:00-10:00 UTC Mon-Fri'"""
        windows = ", ".join(f"{_hhmm(start)}-{_hhmm(end)}" for start, end in self.windows)
        days = [_WEEKDAYS[d].title() for d in sorted(self.days)]
        span = (
            f"{days[0]}-{days[-1]}"
            if len(days) > 2 and len(days) == self._span()
            else ", ".join(days)
        )
        return f"{windows} UTC {span}"

    def _span(self) -> int:
        return max(self.days) - min(self.days) + 1

    def peak_seconds(self, start: datetime, end: datetime) -> float:
        """How many seconds of [start, end) fall in peak windows."""
        total = 0.0
        for begin, finish in self._around(start):
            if begin >= end:
                break
            total += (min(finish, end) - max(begin, start)).total_seconds()
        return total

    def is_peak(self, at: datetime) -> bool:
        """Whether `at` falls in a peak window."""
        first = next(self._around(at), None)
        return first is not None and first[0] <= at

    def next_change(self, at: datetime) -> datetime | None:
        """When peak turns off-peak or back after `at` (None: not within the horizon)."""
        first = next(self._around(at), None)
        if first is None:
            return None
        return first[1] if first[0] <= at else first[0]


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens: cache-hit prompt, cache-miss prompt, completion."""

    cache_hit: float
    cache_miss: float
    output: float


@dataclass(slots=True)
class Charge:
    """What one answer is counted as costing.

    A value, never changed once made; not a frozen dataclass only because one is made per
    answer and a frozen one costs several times as much to make (issue 12)."""

    #: USD, or None when the model has no price
    usd: float | None
    #: the server left out usage, so the answer is counted at the most it could have cost
    worst_case: bool


@dataclass(frozen=True, slots=True)
class InForce:
    """A model's price and rates over a span in which neither can change: what
    `PriceTable` keeps per model, so that an answer is priced without a calendar look-up."""

    price: Price
    rates: Rates
    #: what share of the cost is paid under an old-style daily discount (None: none applies)
    factor: float | None
    #: in the price's peak hours (`Price.is_peak`)
    peak: bool
    start: datetime
    #: the first instant the price or its rates may change (None: never)
    end: datetime | None
    #: `start` and `end` in epoch microseconds (`epoch.epoch_us`), as the meter stamps times
    start_us: int
    end_us: int | None

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)

    def covers_us(self, at: int) -> bool:
        """`covers` for a time in epoch microseconds."""
        return self.start_us <= at and (self.end_us is None or at < self.end_us)


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices per million tokens, in force from `since`."""

    model: str
    since: datetime
    currency: str
    cache_hit: float
    cache_miss: float
    output: float
    off_peak: OffPeak | None = None
    #: the calendar of peak hours; outside them `off_peak_prices` apply
    peak_hours: PeakHours | None = None
    off_peak_prices: Rates | None = None
    #: other names the server accepts for this model, billed at its price
    aliases: tuple[str, ...] = ()

    def is_peak(self, at: datetime) -> bool:
        """Whether `at` is in this price's peak hours (False when it has none)."""
        return self.peak_hours is not None and self.peak_hours.is_peak(at)

    @property
    def peak_rates(self) -> Rates:
        """The rates in peak hours (a price without peak hours: its only rates)."""
        return Rates(self.cache_hit, self.cache_miss, self.output)

    @property
    def off_peak_rates(self) -> Rates:
        """The rates outside peak hours (a price without peak hours: its only rates)."""
        return self.off_peak_prices or self.peak_rates

    def rates(self, at: datetime) -> Rates:
        """The rates in force at `at`, before any old-style daily discount."""
        if self.peak_hours is None or self.off_peak_prices is None or self.is_peak(at):
            return self.peak_rates
        return self.off_peak_prices

    def off_peak_saving(self) -> float:
        """The share of a typical request's cost saved off-peak (0.5 is half price): taken
        from the miss and output prices, which make up nearly all of a bill."""
        off = self.off_peak_prices
        if self.peak_hours is None or off is None:
            return 0.0
        peak = self.cache_miss + self.output
        return 1.0 - (off.cache_miss + off.output) / peak if peak else 0.0


def _day(value: Any, where: str, key: str = "from") -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"{where}: {key!r} must be a date such as 2025-09-29") from None


def _clock(value: Any, where: str) -> time:
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{where}: times must look like 16:30") from None


def _currency(entry: dict[str, Any], number: int, source: str, path: Path | None) -> str:
    """The entry's currency (USD when it names none), refused unless it is `CURRENCY`."""
    currency = str(entry.get("currency", CURRENCY)).strip().upper()
    if currency != CURRENCY:
        where = f"price entry {number}" if path is not None else f"{source}, price entry {number}"
        raise ConfigError(
            f"{where} ({entry.get('model')}) is priced in {currency}, but costs and "
            f"--max-cost are in {CURRENCY}: give its prices in {CURRENCY}",
            path=path,
        )
    return currency


def _window(value: Any, where: str) -> tuple[timedelta, timedelta]:
    """'01:00-04:00' as offsets from midnight; the end may be 24:00."""
    text = str(value)
    try:
        first, second = (part.strip() for part in text.split("-"))
        start = _offset(first)
        end = timedelta(days=1) if second == "24:00" else _offset(second)
    except ValueError:
        raise ConfigError(f"{where}: a window looks like 01:00-04:00, not {text!r}") from None
    if not start < end:
        raise ConfigError(f"{where}: window {text!r} ends before it starts (split it at 24:00)")
    return start, end


def _offset(text: str) -> timedelta:
    moment = time.fromisoformat(text)
    return timedelta(hours=moment.hour, minutes=moment.minute, seconds=moment.second)


def _peak_hours(name: str, table: dict[str, Any], where: str) -> PeakHours:
    try:
        days = frozenset(_WEEKDAYS.index(str(d).strip().lower()[:3]) for d in table["days"])
        windows = tuple(sorted(_window(w, where) for w in table["windows"]))
        listed = table.get("holidays", [])
        if not isinstance(listed, list):
            raise ConfigError(f"{where}: 'holidays' is a list of dates, such as ['2026-10-01']")
        holidays = frozenset(_day(h, where, "holidays").date() for h in listed)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: days are names such as Mon, holidays dates") from None
    return PeakHours(name=name, days=days, windows=windows, holidays=holidays)


def _calendars(layers: list[tuple[dict[str, Any], str]]) -> dict[str, PeakHours]:
    """The `[peak.NAME]` tables of every file, later files' keys replacing earlier ones."""
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for data, source in layers:
        tables = data.get("peak", {})
        if not isinstance(tables, dict):
            raise ConfigError(f"{source}: expected [peak.NAME] tables")
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [peak.{name}] must be a table")
            merged.setdefault(name, {}).update(table)
            sources[name] = source
    return {
        name: _peak_hours(name, table, f"{sources[name]}, [peak.{name}]")
        for name, table in merged.items()
    }


def _rates(value: Any) -> Rates:
    return Rates(
        cache_hit=float(value["cache_hit"]),
        cache_miss=float(value["cache_miss"]),
        output=float(value["output"]),
    )


def _parse(
    data: dict[str, Any],
    source: str,
    calendars: dict[str, PeakHours],
    *,
    path: Path | None = None,
) -> list[Price]:
    entries = data.get("price", [])
    if not isinstance(entries, list) or not (entries or "peak" in data):
        raise ConfigError(f"{source}: expected [[price]] entries or [peak.NAME] tables")
    prices = []
    for number, entry in enumerate(entries, start=1):
        where = f"{source}, price entry {number}"
        try:
            since = _day(entry["from"], where)
            off = entry.get("off_peak")
            off_peak = None
            if off is not None:
                off_peak = OffPeak(
                    start=_clock(off["start"], where),
                    end=_clock(off["end"], where),
                    discount=float(off["discount"]),
                    since=_day(off.get("from", entry["from"]), where),
                )
            peak_hours = None
            if "peak_hours" in entry:
                peak_hours = calendars.get(str(entry["peak_hours"]))
                if peak_hours is None:
                    raise ConfigError(
                        f"{where}: peak_hours {entry['peak_hours']!r} names no [peak.*] table"
                    )
            off_prices = entry.get("off_peak_prices")
            if (peak_hours is None) != (off_prices is None):
                raise ConfigError(f"{where}: peak_hours and off_peak_prices go together")
            prices.append(
                Price(
                    model=str(entry["model"]),
                    since=since,
                    currency=_currency(entry, number, source, path),
                    cache_hit=float(entry["cache_hit"]),
                    cache_miss=float(entry["cache_miss"]),
                    output=float(entry["output"]),
                    off_peak=off_peak,
                    peak_hours=peak_hours,
                    off_peak_prices=None if off_prices is None else _rates(off_prices),
                    aliases=tuple(str(a) for a in entry.get("aliases", ())),
                )
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return prices


class PriceTable:
    """Prices by model and date."""

    def __init__(self, prices: list[Price]) -> None:
        self._by_model: dict[str, list[Price]] = {}
        #: legacy name -> the model it is billed as
        self._aliases: dict[str, str] = {}
        for price in prices:
            entries = self._by_model.setdefault(price.model, [])
            entries[:] = [p for p in entries if p.since != price.since]  # later files override
            entries.append(price)
            self._aliases.update(dict.fromkeys(price.aliases, price.model))
        for entries in self._by_model.values():
            entries.sort(key=lambda p: p.since)
        self._warned: set[str] = set()
        #: the span in force per model name, from the last answer priced (issue 12)
        self._in_force: dict[str, InForce] = {}

    @classmethod
    def load(cls, extra: Path | None = None) -> PriceTable:
        """The shipped prices, with a user's file laid over them."""
        shipped = resources.files("batchrun").joinpath("data/prices.toml").read_text("utf-8")
        layers: list[tuple[dict[str, Any], str, Path | None]] = [
            (tomllib.loads(shipped), "the shipped price table", None)
        ]
        if extra is not None:
            try:
                data = tomllib.loads(Path(extra).read_text("utf-8"))
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the price file: {exc.strerror}", path=extra
                ) from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"not valid TOML: {exc}", path=extra) from None
            layers.append((data, str(extra), Path(extra)))
        calendars = _calendars([(data, source) for data, source, _ in layers])
        prices: list[Price] = []
        for data, source, path in layers:
            prices += _parse(data, source, calendars, path=path)
        return cls(prices)

    def knows(self, model: str) -> bool:
        return model in self._by_model or model in self._aliases

    def price_for(self, model: str, at: datetime) -> Price | None:
        """The price of `model` (or of the model a legacy name is billed as) in force at
        `at`, or None if none is known."""
        entries = self._entries(model)
        if not entries:
            return None
        current = None
        for price in entries:
            if price.since <= at:
                current = price
        return current or entries[0]  # before the first known date: the earliest price

    def _entries(self, model: str) -> list[Price] | None:
        return self._by_model.get(model) or self._by_model.get(self._aliases.get(model, ""))

    def in_force(self, model: str, at: datetime) -> InForce | None:
        """The price of `model` in force at `at` and its rates there, with the span around
        `at` in which neither changes; None if no price is known. The span is kept per
        model: answers sent within it are priced without looking the price up again."""
        span = self._in_force.get(model)
        if span is not None and span.covers(at):
            return span
        price = self.price_for(model, at)
        if price is None:
            return None
        off = price.off_peak
        factor = 1.0 - off.discount if off is not None and off.applies(at) else None
        peak = price.is_peak(at)
        end = self._next_change(model, price, at)
        span = InForce(
            price,
            price.rates(at),
            factor,
            peak,
            at,
            end,
            epoch_us(at),
            None if end is None else epoch_us(end),
        )
        self._in_force[model] = span
        return span

    def _in_force_at(self, model: str, at: datetime | int) -> InForce | None:
        """`in_force`, with `at` a `datetime` or epoch microseconds (the meter's stamps): a
        time in the model's last span is priced with no `datetime` made (issue 12)."""
        if type(at) is int:
            span = self._in_force.get(model)
            if span is not None and span.covers_us(at):
                return span
            at = from_epoch_us(at)
        assert isinstance(at, datetime)
        return self.in_force(model, at)

    def _next_change(self, model: str, price: Price, at: datetime) -> datetime | None:
        """The first instant after `at` where `model`'s price or rates may change: its next
        price entry, a peak window's edge, an old-style discount window's edge."""
        changes = [p.since for p in self._entries(model) or () if p.since > at][:1]
        if price.peak_hours is not None:
            # beyond the calendar's horizon: look again in a day
            changes.append(price.peak_hours.next_change(at) or at + timedelta(days=1))
        if price.off_peak is not None:
            changes.append(price.off_peak.next_change(at))
        return min(changes, default=None)

    def cost(
        self,
        model: str | None,
        at: datetime | int,
        *,
        prompt_tokens: int | None,
        cache_hit_tokens: int | None,
        cache_miss_tokens: int | None,
        completion_tokens: int | None,
    ) -> float | None:
        """Cost of one answer in the price's currency, or None for an unknown model or usage.
        `at`: when it was sent, a `datetime` or epoch microseconds (`epoch.epoch_us`)."""
        if model is None or prompt_tokens is None:
            return None
        span = self._in_force_at(model, at)
        if span is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("price_unknown", model=model, note="cost_usd is null for its rows")
            return None
        if cache_hit_tokens is None or cache_miss_tokens is None:
            hit, miss = 0, prompt_tokens  # a server that does not say: all at the miss price
        else:
            hit, miss = cache_hit_tokens, cache_miss_tokens
        rates = span.rates
        total = (
            hit * rates.cache_hit
            + miss * rates.cache_miss
            + (completion_tokens or 0) * rates.output
        ) / PER_TOKENS
        if span.factor is not None:
            total *= span.factor
        return total

    def charge(
        self,
        model: str | None,
        at: datetime | int,
        *,
        prompt_tokens: int | None,
        cache_hit_tokens: int | None,
        cache_miss_tokens: int | None,
        completion_tokens: int | None,
        prompt_at_most: int,
        completion_cap: int,
    ) -> Charge:
        """What an answer is counted as costing: its usage at its price, and where the server
        left a usage figure out, the most it could be (`prompt_at_most`, `completion_cap`),
        so that a spend cap holds whatever a proxy strips from its answers."""
        worst = prompt_tokens is None or completion_tokens is None
        usd = self.cost(
            model,
            at,
            prompt_tokens=prompt_at_most if prompt_tokens is None else prompt_tokens,
            cache_hit_tokens=cache_hit_tokens,
            cache_miss_tokens=cache_miss_tokens,
            completion_tokens=completion_cap if completion_tokens is None else completion_tokens,
        )
        return Charge(usd, worst and usd is not None)

    def worst_case(
        self, model: str, at: datetime, *, prompt_tokens: int, completion_cap: int
    ) -> float:
        """The most a request could cost: every prompt token a cache miss, the whole cap used,
        at the peak price (a retry may be sent in a peak window). An unknown model counts as
        free here (its cost is unknown, not zero, in the output)."""
        span = self.in_force(model, at)
        if span is None:
            return 0.0
        price = span.price
        return (prompt_tokens * price.cache_miss + completion_cap * price.output) / PER_TOKENS

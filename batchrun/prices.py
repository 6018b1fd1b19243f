"""What a row cost: its usage times the price in force when it was sent.

Prices live in a data file shipped in the package (`data/prices.toml`); a user file in the
same shape adds models or overrides entries. An unknown model costs None, with one warning,
never a made-up number.

Every cost is in USD (`CURRENCY`): `cost_usd` and `--max-cost` are sums of one currency, so a
price file in another currency is refused rather than converted or added to them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

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


@dataclass(frozen=True, slots=True)
class Charge:
    """What one answer is counted as costing."""

    #: USD, or None when the model has no price
    usd: float | None
    #: the server left out usage, so the answer is counted at the most it could have cost
    worst_case: bool


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


def _day(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"{where}: 'from' must be a date such as 2025-09-29") from None


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


def _parse(data: dict[str, Any], source: str, *, path: Path | None = None) -> list[Price]:
    entries = data.get("price")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: expected [[price]] entries")
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
            prices.append(
                Price(
                    model=str(entry["model"]),
                    since=since,
                    currency=_currency(entry, number, source, path),
                    cache_hit=float(entry["cache_hit"]),
                    cache_miss=float(entry["cache_miss"]),
                    output=float(entry["output"]),
                    off_peak=off_peak,
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
        for price in prices:
            entries = self._by_model.setdefault(price.model, [])
            entries[:] = [p for p in entries if p.since != price.since]  # later files override
            entries.append(price)
        for entries in self._by_model.values():
            entries.sort(key=lambda p: p.since)
        self._warned: set[str] = set()

    @classmethod
    def load(cls, extra: Path | None = None) -> PriceTable:
        """The shipped prices, with a user's file laid over them."""
        shipped = resources.files("batchrun").joinpath("data/prices.toml").read_text("utf-8")
        prices = _parse(tomllib.loads(shipped), "the shipped price table")
        if extra is not None:
            try:
                data = tomllib.loads(Path(extra).read_text("utf-8"))
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the price file: {exc.strerror}", path=extra
                ) from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"not valid TOML: {exc}", path=extra) from None
            prices += _parse(data, str(extra), path=Path(extra))
        return cls(prices)

    def knows(self, model: str) -> bool:
        return model in self._by_model

    def price_for(self, model: str, at: datetime) -> Price | None:
        """The price of `model` in force at `at`, or None if none is known."""
        entries = self._by_model.get(model)
        if not entries:
            return None
        current = None
        for price in entries:
            if price.since <= at:
                current = price
        return current or entries[0]  # before the first known date: the earliest price

    def cost(
        self,
        model: str | None,
        at: datetime,
        *,
        prompt_tokens: int | None,
        cache_hit_tokens: int | None,
        cache_miss_tokens: int | None,
        completion_tokens: int | None,
    ) -> float | None:
        """Cost of one answer in the price's currency, or None for an unknown model or usage."""
        if model is None or prompt_tokens is None:
            return None
        price = self.price_for(model, at)
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("price_unknown", model=model, note="cost_usd is null for its rows")
            return None
        if cache_hit_tokens is None or cache_miss_tokens is None:
            hit, miss = 0, prompt_tokens  # a server that does not say: all at the miss price
        else:
            hit, miss = cache_hit_tokens, cache_miss_tokens
        total = (
            hit * price.cache_hit
            + miss * price.cache_miss
            + (completion_tokens or 0) * price.output
        ) / PER_TOKENS
        if price.off_peak is not None and price.off_peak.applies(at):
            total *= 1.0 - price.off_peak.discount
        return total

    def charge(
        self,
        model: str | None,
        at: datetime,
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
        """The most a request could cost: every prompt token a cache miss, the whole cap used.
        An unknown model counts as free here (its cost is unknown, not zero, in the output)."""
        price = self.price_for(model, at)
        if price is None:
            return 0.0
        return (prompt_tokens * price.cache_miss + completion_cap * price.output) / PER_TOKENS

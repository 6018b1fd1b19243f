"""Prices: the shipped table, user overrides, dates, off-peak hours and unknown models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from batchrun.cli import cli
from batchrun.epoch import epoch_us
from batchrun.errors import ConfigError
from batchrun.fake import FakeServer
from batchrun.prices import PriceTable
from tests.conftest import write_jsonl

LATE_2025 = datetime(2025, 11, 1, 12, 0, tzinfo=UTC)


def _usage(prompt: int, completion: int, *, hit: int = 0) -> dict[str, int]:
    """An answer's usage as `PriceTable.cost` takes it: `hit` of the prompt from the cache."""
    return {
        "prompt_tokens": prompt,
        "cache_hit_tokens": hit,
        "cache_miss_tokens": prompt - hit,
        "completion_tokens": completion,
    }


def test_chat_cost_with_cache_hits() -> None:
    """A deepseek-chat answer: hits, misses and completion at the V3.2 prices."""
    table = PriceTable.load()
    cost = table.cost(
        "deepseek-chat",
        LATE_2025,
        prompt_tokens=1000,
        cache_hit_tokens=640,
        cache_miss_tokens=360,
        completion_tokens=500,
    )
    assert cost == pytest.approx((640 * 0.028 + 360 * 0.28 + 500 * 0.42) / 1e6)


def test_reasoner_cost_before_v31_uses_its_own_prices() -> None:
    """A reasoner answer from mid-2025 (daytime) is priced at the reasoner's prices then."""
    table = PriceTable.load()
    at = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    cost = table.cost(
        "deepseek-reasoner",
        at,
        prompt_tokens=100,
        cache_hit_tokens=64,
        cache_miss_tokens=36,
        completion_tokens=2000,
    )
    assert cost == pytest.approx((64 * 0.14 + 36 * 0.55 + 2000 * 2.19) / 1e6)


def test_off_peak_discount_applies_across_midnight() -> None:
    """Between 16:30 and 00:30 UTC in 2025, before V3.1, chat is half price."""
    table = PriceTable.load()
    usage = _usage(1000, 0)
    day = table.cost("deepseek-chat", datetime(2025, 6, 1, 12, 0, tzinfo=UTC), **usage)
    night = table.cost("deepseek-chat", datetime(2025, 6, 1, 23, 59, tzinfo=UTC), **usage)
    after_midnight = table.cost("deepseek-chat", datetime(2025, 6, 2, 0, 15, tzinfo=UTC), **usage)
    assert day is not None and night == pytest.approx(day / 2) == after_midnight


def test_missing_cache_fields_price_the_prompt_as_misses() -> None:
    """A reseller that omits the cache split: every prompt token at the miss price."""
    cost = PriceTable.load().cost(
        "deepseek-chat",
        LATE_2025,
        prompt_tokens=100,
        cache_hit_tokens=None,
        cache_miss_tokens=None,
        completion_tokens=0,
    )
    assert cost == pytest.approx(100 * 0.28 / 1e6)


def test_unknown_model_costs_none_with_one_warning() -> None:
    """An unknown model is never given a made-up price, and is warned about once."""
    table = PriceTable.load()
    usage = _usage(10, 5)
    with capture_logs() as logs:
        assert table.cost("mystery-model", LATE_2025, **usage) is None
        assert table.cost("mystery-model", LATE_2025, **usage) is None
    assert [entry["event"] for entry in logs] == ["price_unknown"]


def test_user_file_adds_and_overrides(tmp_path: Path) -> None:
    """A user's price file adds a model and overrides a shipped entry of the same date."""
    extra = tmp_path / "prices.toml"
    extra.write_text(
        '[[price]]\nmodel = "my-model"\nfrom = "2025-01-01"\ncache_hit = 1\ncache_miss = 2\n'
        'output = 3\n[[price]]\nmodel = "deepseek-chat"\nfrom = "2025-09-29"\ncache_hit = 0\n'
        "cache_miss = 1\noutput = 1\n"
    )
    table = PriceTable.load(extra)
    usage = _usage(10, 10)
    assert table.cost("my-model", LATE_2025, **usage) == pytest.approx(50 / 1e6)
    assert table.cost("deepseek-chat", LATE_2025, **usage) == pytest.approx(20 / 1e6)


def test_bad_price_file_names_the_entry(tmp_path: Path) -> None:
    """A price entry without a required key is refused, naming the file and the entry."""
    extra = tmp_path / "prices.toml"
    extra.write_text('[[price]]\nmodel = "x"\nfrom = "2025-01-01"\ncache_hit = 1\n')
    with pytest.raises(ConfigError, match=r"prices.toml, price entry 1: missing key 'cache_miss'"):
        PriceTable.load(extra)


CNY_ENTRY = (
    '[[price]]\nmodel = "deepseek-chat"\nfrom = "2025-09-29"\ncurrency = "CNY"\n'
    "cache_hit = 0.2\ncache_miss = 2\noutput = 3\n"
)


def test_price_file_in_another_currency_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A CNY price file is refused (costs and the cap are USD), never summed into cost_usd."""
    extra = tmp_path / "cny.toml"
    extra.write_text(CNY_ENTRY)
    with pytest.raises(ConfigError, match=r"cny.toml: price entry 1 .* is priced in CNY"):
        PriceTable.load(extra)


def test_run_with_a_foreign_currency_price_file_sends_nothing(
    tmp_path: Path, fake: FakeServer
) -> None:
    """`batchrun run --prices cny.toml` exits 2 naming the file, before any request."""
    extra = tmp_path / "cny.toml"
    extra.write_text(CNY_ENTRY)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--base-url",
            fake.base_url,
            "--prices",
            str(extra),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "cny.toml" in result.output and "CNY" in result.output
    assert fake.stats()["requests"] == 0


def test_a_refused_price_file_or_cap_leaves_no_checkpoint_and_the_fixed_job_runs(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A CNY price file, or --max-cost with a row's model that has no price, is refused before
    the checkpoint is made: nothing is left behind, and the corrected command runs rather than
    being told "the job changed since its checkpoint was made"."""
    extra = tmp_path / "cny.toml"
    extra.write_text(CNY_ENTRY)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello", "model": "fake-own-model"}])
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out.parquet"\n[prompt]\nrow_params = ["model"]\n')
    base = ["run", str(job), "--base-url", fake.base_url, "-q"]
    for refused, words in (
        (["--prices", str(extra)], "priced in CNY"),
        (
            ["--max-cost", "1"],
            "max_cost cannot be kept for a model without a price (fake-own-model)",
        ),
    ):
        result = CliRunner().invoke(cli, [*base, *refused])
        assert result.exit_code == 2, result.output
        assert words in result.output
        assert not (tmp_path / "out.parquet.parts").exists()
    assert fake.stats()["requests"] == 0
    fixed = CliRunner().invoke(cli, base)
    assert fixed.exit_code == 0, fixed.output
    assert fake.stats()["requests"] == 1


# DeepSeek V4.1, from 2026-08-16 16:00 UTC: peak 01:00-04:00 and 06:00-10:00 UTC, Mon-Fri
FLASH_PEAK = (0.006, 0.30, 1.20)
FLASH_OFF_PEAK = (0.003, 0.15, 0.60)
V4_USAGE = _usage(1000, 2000, hit=400)


def _by_hand(rates: tuple[float, float, float]) -> float:
    hit, miss, output = rates
    return (400 * hit + 600 * miss + 2000 * output) / 1e6


@pytest.mark.parametrize(
    ("at", "rates"),
    [
        pytest.param(datetime(2026, 12, 1, 3, 59, tzinfo=UTC), FLASH_PEAK, id="tue-03:59-peak"),
        pytest.param(datetime(2026, 12, 1, 4, 0, tzinfo=UTC), FLASH_OFF_PEAK, id="tue-04:00-off"),
        pytest.param(datetime(2026, 12, 1, 0, 59, tzinfo=UTC), FLASH_OFF_PEAK, id="tue-00:59-off"),
        pytest.param(datetime(2026, 12, 1, 6, 0, tzinfo=UTC), FLASH_PEAK, id="tue-06:00-peak"),
        pytest.param(datetime(2026, 12, 1, 10, 0, tzinfo=UTC), FLASH_OFF_PEAK, id="tue-10:00-off"),
        pytest.param(datetime(2026, 12, 5, 3, 0, tzinfo=UTC), FLASH_OFF_PEAK, id="sat-03:00-off"),
        pytest.param(datetime(2026, 12, 6, 8, 0, tzinfo=UTC), FLASH_OFF_PEAK, id="sun-08:00-off"),
    ],
)
def test_flash_is_priced_by_the_hour_it_was_sent(at: datetime, rates: tuple[float, ...]) -> None:
    """deepseek-flash costs the peak price in a weekday peak window and half outside it."""
    cost = PriceTable.load().cost("deepseek-flash", at, **V4_USAGE)
    assert cost == pytest.approx(_by_hand(rates))


def test_a_time_in_epoch_microseconds_is_priced_as_its_datetime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The meter stamps requests in epoch microseconds: one inside the model's last span is
    priced from that span with no `datetime` made (the fast path), and one past the span's
    end (peak 03:59:59.999999 -> off-peak 04:00) is looked up again, as a `datetime` is."""
    import batchrun.prices

    made: list[int] = []
    convert = batchrun.prices.from_epoch_us

    def counted(stamp: int) -> datetime:
        made.append(stamp)
        return convert(stamp)

    monkeypatch.setattr(batchrun.prices, "from_epoch_us", counted)
    table = PriceTable.load()
    before = datetime(2026, 12, 1, 3, 59, 59, 999999, tzinfo=UTC)
    table.cost("deepseek-flash", before - timedelta(minutes=5), **V4_USAGE)  # the peak span
    peak = table.cost("deepseek-flash", epoch_us(before), **V4_USAGE)
    assert made == []  # inside the span: no datetime made
    off = table.cost("deepseek-flash", epoch_us(before) + 1, **V4_USAGE)
    assert made == [epoch_us(before) + 1]  # past its end: looked up again
    assert peak == pytest.approx(_by_hand(FLASH_PEAK))
    assert off == pytest.approx(_by_hand(FLASH_OFF_PEAK))
    assert table.cost("deepseek-flash", epoch_us(before), **V4_USAGE) == peak  # and back


def test_legacy_flash_names_are_billed_at_the_flash_price() -> None:
    """deepseek-v4-flash and deepseek-v4-flash-vision-exp are known and cost what Flash does."""
    table = PriceTable.load()
    at = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    for legacy in ("deepseek-v4-flash", "deepseek-v4-flash-vision-exp"):
        assert table.knows(legacy)
        assert table.cost(legacy, at, **V4_USAGE) == pytest.approx(_by_hand(FLASH_PEAK))


def test_v4_pro_peak_and_off_peak_prices() -> None:
    """deepseek-v4-pro: 0.044/1.32/3.96 at peak, 0.022/0.66/1.98 off-peak."""
    table = PriceTable.load()
    peak = table.cost("deepseek-v4-pro", datetime(2026, 12, 2, 7, 0, tzinfo=UTC), **V4_USAGE)
    off = table.cost("deepseek-v4-pro", datetime(2026, 12, 2, 12, 0, tzinfo=UTC), **V4_USAGE)
    assert peak == pytest.approx(_by_hand((0.044, 1.32, 3.96)))
    assert off == pytest.approx(_by_hand((0.022, 0.66, 1.98)))


def test_a_listed_holiday_is_off_peak_all_day(tmp_path: Path) -> None:
    """A holiday in the user's [peak.deepseek] list is off-peak in a window that is peak
    without the list, and the shipped windows stay (only `holidays` was replaced)."""
    extra = tmp_path / "holidays.toml"
    extra.write_text('[peak.deepseek]\nholidays = ["2026-10-01"]\n')
    holiday, next_day = (datetime(2026, 10, d, 3, 0, tzinfo=UTC) for d in (1, 2))  # Thu, Fri
    shipped, listed = PriceTable.load(), PriceTable.load(extra)
    assert shipped.cost("deepseek-flash", holiday, **V4_USAGE) == pytest.approx(
        _by_hand(FLASH_PEAK)
    )
    assert listed.cost("deepseek-flash", holiday, **V4_USAGE) == pytest.approx(
        _by_hand(FLASH_OFF_PEAK)
    )
    assert listed.cost("deepseek-flash", next_day, **V4_USAGE) == pytest.approx(
        _by_hand(FLASH_PEAK)
    )


@pytest.mark.parametrize(
    ("holidays", "message"),
    [
        pytest.param('["2026-13-01"]', r"'holidays' must be a date", id="not-a-date"),
        pytest.param('"2026-10-01"', r"'holidays' is a list of dates", id="not-a-list"),
    ],
)
def test_a_bad_holiday_is_refused_naming_holidays(
    tmp_path: Path, holidays: str, message: str
) -> None:
    """A holiday that is not a date, or a single date not in a list, is refused naming the
    file, the [peak.*] table and `holidays` (not a `from` the file never had)."""
    extra = tmp_path / "holidays.toml"
    extra.write_text(f"[peak.deepseek]\nholidays = {holidays}\n")
    with pytest.raises(ConfigError, match=r"holidays.toml, \[peak.deepseek\]: " + message):
        PriceTable.load(extra)


def test_peak_hours_naming_no_calendar_is_refused(tmp_path: Path) -> None:
    """A price whose peak_hours names no [peak.*] table is refused, naming the entry."""
    extra = tmp_path / "prices.toml"
    extra.write_text(
        '[[price]]\nmodel = "m"\nfrom = "2026-01-01"\ncache_hit = 1\ncache_miss = 2\n'
        'output = 3\npeak_hours = "nowhere"\n'
        "off_peak_prices = { cache_hit = 1, cache_miss = 1, output = 1 }\n"
    )
    with pytest.raises(ConfigError, match=r"price entry 1: peak_hours 'nowhere' names no"):
        PriceTable.load(extra)


def _walk(start: datetime, days: int) -> list[datetime]:
    """Instants over `days` in time order: every 7 minutes, and a microsecond either side
    of every quarter hour (where the shipped windows begin and end)."""
    moments: list[datetime] = []
    step = timedelta(minutes=7)
    at = start
    while at < start + timedelta(days=days):
        moments.append(at)
        at += step
    quarter = start
    while quarter < start + timedelta(days=days):
        for edge in (quarter - timedelta(microseconds=1), quarter):
            moments.append(edge)
        quarter += timedelta(minutes=15)
    return sorted(moments)


@pytest.mark.parametrize(
    ("model", "start", "days"),
    [
        # an old-style daily discount (16:30-00:30) switched on at its `from`, then a new price
        ("deepseek-chat", datetime(2025, 2, 24, tzinfo=UTC), 4),
        ("deepseek-chat", datetime(2025, 9, 3, tzinfo=UTC), 3),
        # peak windows on weekdays (01:00-04:00, 06:00-10:00), the weekend off-peak, and the
        # first price's own start (16:00)
        ("deepseek-v4-flash", datetime(2026, 8, 14, tzinfo=UTC), 5),
    ],
)
def test_prices_kept_per_span_agree_with_a_fresh_look_up(
    model: str, start: datetime, days: int
) -> None:
    """An answer is priced from the span kept for its model; across every price change, peak
    window and discount window, that is what looking the price up afresh says."""
    kept = PriceTable.load()
    looked_up: set[float | None] = set()
    usage = _usage(1000, 500, hit=600)
    for at in _walk(start, days):
        fresh = PriceTable.load().cost(model, at, **usage)
        assert kept.cost(model, at, **usage) == fresh, at
        looked_up.add(fresh)
    assert len(looked_up) >= 2  # the walk crossed a change


def test_a_kept_span_is_not_used_for_an_earlier_answer() -> None:
    """An answer sent before the span kept for its model (settled after a later one) is
    priced by its own hour."""
    table = PriceTable.load()
    usage = _usage(10, 10)
    off_peak = datetime(2026, 9, 1, 5, 0, tzinfo=UTC)  # a Tuesday, between the windows
    peak = off_peak - timedelta(hours=2)
    assert table.cost("deepseek-flash", off_peak, **usage) == pytest.approx(10 * 0.75 / 1e6)
    assert table.cost("deepseek-flash", peak, **usage) == pytest.approx(10 * 1.5 / 1e6)

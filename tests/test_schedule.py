"""The off-peak schedule: runs that send only off-peak, on a clock the test sets."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from batchrun.errors import Interrupted
from batchrun.fake import FakeConfig, FakeServer
from batchrun.job import build_job
from batchrun.limits import Limiter, SpendCap
from batchrun.meter import AttemptMeter
from batchrun.pool import PoolSettings
from batchrun.prices import PriceTable
from batchrun.progress import Tally
from batchrun.ratelimit import LocalRateLimiter
from batchrun.runner import RunSummary, run_job
from batchrun.schedule import OffPeakSchedule, peak_wait
from tests.conftest import ManualClock, fast_job_data, write_jsonl

# Tuesday 1 December 2026; peak 01:00-04:00 and 06:00-10:00 UTC
TUESDAY = datetime(2026, 12, 1, tzinfo=UTC)
#: Flash's prices under a name the fake answers (it knows no deepseek-flash yet)
FLASH_LIKE = """
[[price]]
model = "fake-flash"
from = "2026-08-16T16:00:00Z"
cache_hit = 0.006
cache_miss = 0.30
output = 1.20
peak_hours = "deepseek"
off_peak_prices = { cache_hit = 0.003, cache_miss = 0.15, output = 0.60 }
"""
PEAK, OFF_PEAK = (0.006, 0.30, 1.20), (0.003, 0.15, 0.60)


class JumpingClock(ManualClock):
    """A ManualClock that moves itself to `to` at the first reading after `after()` holds:
    the run crosses into a peak window at a point the test chose, however loaded the machine."""

    def __init__(self, at: datetime, *, after: Callable[[], bool], to: datetime) -> None:
        super().__init__(at)
        self._after: Callable[[], bool] | None = after
        self._to = to

    def now(self) -> datetime:
        if self._after is not None and self._after():
            self._after = None
            self.set(self._to)
        return super().now()


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _job(tmp_path: Path, fake: FakeServer, rows: int, **extra: Any) -> Any:
    (tmp_path / "prices.toml").write_text(FLASH_LIKE)
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q {i}"} for i in range(rows)])
    data = fast_job_data(
        tmp_path, fake.base_url, model="fake-flash", prices=str(tmp_path / "prices.toml"), **extra
    )
    return build_job(data)


def _in_thread(job: Any, settings: PoolSettings) -> tuple[threading.Thread, list[Any]]:
    """run_job in a thread, so that the test can move the clock meanwhile."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(run_job(job, settings=settings))
        except BaseException as exc:  # handed to the test, which fails on it
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _by_hand(row: dict[str, Any], rates: tuple[float, float, float]) -> float:
    hit, miss, output = rates
    return (
        row["prompt_cache_hit_tokens"] * hit
        + row["prompt_cache_miss_tokens"] * miss
        + row["completion_tokens"] * output
    ) / 1e6


def _rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def test_peak_wait_names_the_end_of_the_window_and_the_saving() -> None:
    """At 03:00 on a Tuesday Flash waits until 04:00 and saves 50%; at 04:00 it does not wait."""
    table = PriceTable.load()
    wait = peak_wait(table, "deepseek-flash", TUESDAY.replace(hour=3))
    assert wait is not None
    assert wait.note(TUESDAY.replace(hour=3)) == "waiting for off-peak until 04:00 UTC (saves 50%)"
    assert peak_wait(table, "deepseek-flash", TUESDAY.replace(hour=4)) is None


def test_a_model_without_peak_prices_never_waits() -> None:
    """A reseller's model (no price, or a price without peak hours) is sent at any hour."""
    table = PriceTable.load()
    at = TUESDAY.replace(hour=3)
    assert peak_wait(table, "fake-own-model", at) is None
    assert peak_wait(table, "deepseek-chat", at) is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stop_wakes_a_request_waiting_for_off_peak(anyio_backend: str) -> None:
    """A run that stops during a peak window does not sit out the window."""
    stop, tally = anyio.Event(), Tally()
    clock = ManualClock(TUESDAY.replace(hour=7))
    schedule = OffPeakSchedule(PriceTable.load(), clock=clock, stop=stop, tally=tally)
    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(schedule.wait_off_peak, "deepseek-flash")
            while clock.sleepers == 0:  # noqa: ASYNC110 - the clock is the test's, polled
                await anyio.sleep(0.001)
            assert tally.waiting == "waiting for off-peak until 10:00 UTC (saves 50%)"
            stop.set()
    assert tally.waiting is None


def test_off_peak_run_started_at_peak_sends_nothing_until_the_window_ends(
    tmp_path: Path, fake: FakeServer
) -> None:
    """--off-peak at 03:00 on a weekday: no request until 04:00, the log and the progress say
    why, and at 04:00 the run completes with every row priced off-peak."""
    job = _job(tmp_path, fake, rows=6, schedule="off-peak")
    clock = ManualClock(TUESDAY.replace(hour=3))
    settings = PoolSettings(clock=clock, display="lines", progress_every=0.01)
    with capture_logs() as logs:
        thread, outcome = _in_thread(job, settings)
        _until(lambda: clock.sleepers == job.limits.concurrency, "every worker to wait")
        _until(lambda: any("schedule" in e for e in logs), "a progress line")
        assert fake.stats()["requests"] == 0
        clock.set(TUESDAY.replace(hour=4))
        thread.join(timeout=10)
    summary = outcome[0]
    assert isinstance(summary, RunSummary) and summary.rows_ok == 6
    assert fake.stats()["requests"] == 6
    note = "waiting for off-peak until 04:00 UTC (saves 50%)"
    assert [e["note"] for e in logs if e["event"] == "off_peak_wait"] == [note]
    assert any(e["event"] == "off_peak_resumed" for e in logs)
    assert next(e for e in logs if "schedule" in e)["schedule"] == note
    for row in _rows(tmp_path):
        assert row["started_at"] == TUESDAY.replace(hour=4)
        assert row["cost_usd"] == pytest.approx(_by_hand(row, OFF_PEAK))


def test_off_peak_run_crossing_into_a_peak_window_pauses_and_resumes(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Started at 00:59, the run pauses when 01:00 comes (requests in flight finish), sends
    nothing at peak, and at 04:00 goes on: every row answered once, none lost or sent twice."""
    rows = 20
    fake.reset(FakeConfig(latency=0.01))
    job = _job(tmp_path, fake, rows=rows, schedule="off-peak", limits={"concurrency": 2})
    clock = JumpingClock(
        TUESDAY.replace(hour=0, minute=59),
        after=lambda: fake.stats()["requests"] >= 3,
        to=TUESDAY.replace(hour=1),
    )
    thread, outcome = _in_thread(job, PoolSettings(clock=clock))
    _until(lambda: clock.sleepers == 2, "both workers to wait")
    paused_at = fake.stats()["requests"]
    assert paused_at < rows
    clock.set(TUESDAY.replace(hour=4))
    thread.join(timeout=10)
    summary = outcome[0]
    assert isinstance(summary, RunSummary) and summary.rows_ok == rows
    assert fake.stats()["requests"] == rows
    out = _rows(tmp_path)
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(rows))
    sent = [r["started_at"] for r in out]
    assert set(sent) == {TUESDAY.replace(hour=0, minute=59), TUESDAY.replace(hour=4)}
    assert sum(at.hour == 4 for at in sent) == rows - paused_at
    for row in out:
        assert row["cost_usd"] == pytest.approx(_by_hand(row, OFF_PEAK))


def test_a_run_without_the_schedule_is_priced_at_the_hour_it_sends(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Without --off-peak a run at 03:59 sends at once and pays peak; at 04:00, off-peak."""
    for minute, rates in (
        (TUESDAY.replace(hour=3, minute=59), PEAK),
        (TUESDAY.replace(hour=4), OFF_PEAK),
    ):
        job = _job(tmp_path, fake, rows=3)
        run_job(job, restart=True, settings=PoolSettings(clock=ManualClock(minute)))
        for row in _rows(tmp_path):
            assert row["cost_usd"] == pytest.approx(_by_hand(row, rates))


def test_ctrl_c_while_waiting_for_off_peak_stops_at_once(tmp_path: Path, fake: FakeServer) -> None:
    """Ctrl-C while every request waits for off-peak: the run stops in well under its grace
    period, nothing sent, and the same job then runs to completion off-peak."""
    job = _job(tmp_path, fake, rows=6, schedule="off-peak")
    clock = ManualClock(TUESDAY.replace(hour=7))

    def interrupt() -> None:
        _until(lambda: clock.sleepers == job.limits.concurrency, "every worker to wait")
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    began = time.monotonic()
    with pytest.raises(Interrupted):
        run_job(job, settings=PoolSettings(clock=clock, stop_grace=30))
    thread.join()
    assert time.monotonic() - began < 10
    assert fake.stats()["requests"] == 0
    clock.set(TUESDAY.replace(hour=10))
    assert run_job(job, settings=PoolSettings(clock=clock)).rows_ok == 6


def test_display_pool_line_says_it_waits_for_off_peak() -> None:
    """The live display's pool line and the progress line carry the schedule's note."""
    from rich.console import Console

    from batchrun.progress import progress_fields, render

    note = "waiting for off-peak until 10:00 UTC (saves 50%)"
    stats = Tally(rows_total=10, waiting=note).statistics()
    assert progress_fields(stats)["schedule"] == note
    console = Console(record=True, width=120)
    console.print(render(stats, None))
    assert f"0 in flight, limit -, {note}" in console.export_text()


def test_429s_after_a_long_off_peak_wait_are_asked_again(tmp_path: Path, fake: FakeServer) -> None:
    """A wait for off-peak longer than `outage_timeout` is no silence of the server: the 429s
    met when sending resumes are asked again, as after any answer, not made error rows."""
    (tmp_path / "prices.toml").write_text(FLASH_LIKE)
    prompts = [f"[[fault:429*2@0.01]] q{i}" for i in range(2)]
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    limits = {"concurrency": 2, "max_attempts": 2, "outage_timeout": 0.3}
    data = fast_job_data(
        tmp_path, fake.base_url, model="fake-flash", prices=str(tmp_path / "prices.toml"),
        schedule="off-peak", limits=limits,
    )  # fmt: skip
    job = build_job(data)
    clock = ManualClock(TUESDAY.replace(hour=3))
    thread, outcome = _in_thread(job, PoolSettings(clock=clock))
    _until(lambda: clock.sleepers == 2, "both workers to wait")
    time.sleep(0.6)  # longer than outage_timeout, with no answer meanwhile
    clock.set(TUESDAY.replace(hour=4))
    thread.join(timeout=10)
    summary = outcome[0]
    assert isinstance(summary, RunSummary), summary
    assert summary.rows_ok == 2
    assert [row["rate_limited"] for row in _rows(tmp_path)] == [2, 2]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_off_peak_attempt_takes_its_lease_at_once_and_a_peak_one_waits(
    anyio_backend: str,
) -> None:
    """With the off-peak schedule, an attempt off-peak takes its budgets without an await
    (the meter's fast path); one at peak takes the awaited path and holds nothing."""
    clock = ManualClock(TUESDAY.replace(hour=5))  # between the windows
    schedule = OffPeakSchedule(PriceTable.load(), clock=clock, stop=anyio.Event(), tally=Tally())
    limiter = LocalRateLimiter(Limiter(concurrency=2, adaptive=False), lease_seconds=60.0)
    meter = AttemptMeter(
        limiter=limiter,
        spend=SpendCap(None),
        prices=PriceTable.load(),
        endpoint="http://x",
        clock=clock,
        schedule=schedule,
    )
    body = {"model": "deepseek-flash", "messages": [{"role": "user", "content": "hi"}]}
    off_peak = meter.attempt(meter.request(body), deferred_deadline=True)
    assert off_peak._lease_at_once() and limiter.statistics().in_flight == 1
    clock.set(TUESDAY.replace(hour=7))  # in the 06:00-10:00 window
    at_peak = meter.attempt(meter.request(body), deferred_deadline=True)
    assert not at_peak._lease_at_once() and limiter.statistics().in_flight == 1
    with anyio.move_on_after(0.05):
        await at_peak.__aenter__()  # waits for 10:00
    assert at_peak.lease is None and limiter.statistics().in_flight == 1

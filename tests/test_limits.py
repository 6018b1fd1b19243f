"""Rate budgets: the pure arithmetic, then whole runs against the fake's own limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trio.testing import MockClock

from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.limits import (
    COMPLETION_PRIOR,
    AdaptiveConcurrency,
    Limiter,
    Outcome,
    TokenBucket,
    parse_duration,
)
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from tests.conftest import fast_job_data, write_jsonl

# -- pure arithmetic --------------------------------------------------------------------------


def test_bucket_paces_within_the_budget() -> None:
    """Over any window, a bucket lets through no more than its budget."""
    bucket = TokenBucket(600, window=60.0, now=0.0)
    taken = 0
    now = 0.0
    while now < 60.0:
        wait = bucket.wait_time(1, now)
        if wait > 0:
            now += wait
            continue
        bucket.take(1, now)
        taken += 1
    assert 0.95 * 600 <= taken <= 600


def test_bucket_lets_an_oversized_request_through_when_full() -> None:
    """A request larger than the bucket is not stuck: it goes once the bucket is full."""
    bucket = TokenBucket(1000, window=60.0, now=0.0)
    assert bucket.wait_time(5000, 0.0) == 0.0
    bucket.take(5000, 0.0)
    assert bucket.wait_time(1, 0.0) > 0  # in debt: the next request waits


def test_bucket_returns_unused_tokens_and_charges_overruns() -> None:
    """Settling gives back what a request did not use and takes what it overran."""
    bucket = TokenBucket(10_000, window=60.0, now=0.0)
    bucket.take(150, 0.0)
    bucket.give_back(100, 0.0)
    assert bucket.level == pytest.approx(bucket.capacity - 50)
    bucket.give_back(-300, 0.0)
    assert bucket.level == pytest.approx(bucket.capacity - 350)


def test_lowering_a_bucket_limit_keeps_the_level_inside() -> None:
    """Following a lower server limit shrinks the bucket at once."""
    bucket = TokenBucket(6000, window=60.0, now=0.0)
    bucket.set_limit(600, now=0.0)
    assert bucket.level <= bucket.capacity == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("1s", 1.0, id="seconds"),
        pytest.param("6m0s", 360.0, id="minutes"),
        pytest.param("850ms", 0.85, id="millis"),
        pytest.param("1h2m3.5s", 3723.5, id="compound"),
        pytest.param("2.5", 2.5, id="plain-number"),
        pytest.param("soon", None, id="garbage"),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    """Go-style durations from x-ratelimit-reset-* headers."""
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_adaptive_grows_when_saturated_and_shrinks_on_429() -> None:
    """Concurrency grows with clean answers while saturated, and shrinks on a 429."""
    adaptive = AdaptiveConcurrency(64, start=4)
    for _ in range(20):
        adaptive.on_success(saturated=True, now=0.0)
    assert adaptive.limit == 14
    adaptive.on_success(saturated=False, now=0.0)
    assert adaptive.limit == 14
    assert adaptive.on_rate_limited(in_flight_at_send=13, send_number=1)
    assert adaptive.ceiling == 12 and adaptive.limit == 9


def test_adaptive_ignores_429s_from_before_its_last_shrink() -> None:
    """Several 429s from one round of sends shrink once, not once each."""
    adaptive = AdaptiveConcurrency(64, start=20)
    assert adaptive.on_rate_limited(in_flight_at_send=20, send_number=30)
    adaptive.mark_shrink(40)
    assert not adaptive.on_rate_limited(in_flight_at_send=20, send_number=35)
    assert adaptive.limit == 14


def test_adaptive_probes_slowly_at_its_ceiling() -> None:
    """At the learnt ceiling, growth is a slow probe, never above the maximum."""
    adaptive = AdaptiveConcurrency(10, start=4)
    adaptive.on_rate_limited(in_flight_at_send=7, send_number=1)
    for _ in range(20):
        adaptive.on_success(saturated=True, now=0.0)
    assert adaptive.limit == 6
    for _ in range(5000):
        adaptive.on_success(saturated=True, now=0.0)
    assert adaptive.limit == 10


def test_adaptive_failed_probe_steps_back_to_the_ceiling() -> None:
    """A 429 above the known ceiling returns to it; one at the ceiling lowers it."""
    adaptive = AdaptiveConcurrency(64, start=4)
    adaptive.on_rate_limited(in_flight_at_send=9, send_number=1)
    adaptive.mark_shrink(1)
    adaptive.value = 8.5
    assert adaptive.on_rate_limited(in_flight_at_send=9, send_number=2)
    assert adaptive.limit == 8 and adaptive.ceiling == 8
    adaptive.mark_shrink(2)
    assert adaptive.on_rate_limited(in_flight_at_send=8, send_number=3)
    assert adaptive.ceiling == 7 and adaptive.limit == 5


def test_adaptive_server_errors_pause_growth_without_shrinking() -> None:
    """A 5xx stops growth for a while but does not shrink."""
    adaptive = AdaptiveConcurrency(64, start=8, growth_pause=2.0)
    adaptive.on_server_error(now=10.0)
    adaptive.on_success(saturated=True, now=11.0)
    assert adaptive.limit == 8
    adaptive.on_success(saturated=True, now=12.5)
    adaptive.on_success(saturated=True, now=12.5)
    assert adaptive.limit == 9


# -- whole runs against the fake's limits (windows scaled down to fractions of a second) -----


def budget_run(
    tmp_path: Path, fake: FakeServer, rows: list[dict[str, Any]], **limits: Any
) -> list[dict[str, Any]]:
    """Run rows through the runner; returns the output rows."""
    import gc

    import pyarrow.parquet as pq

    # Windows here are scaled down from a minute to seconds, so a bucket holds only
    # milliseconds of budget; collector pauses over the heap earlier tests left behind would
    # then cost budget they never cost at a real minute. Freeze that heap first.
    gc.collect()
    gc.freeze()

    write_jsonl(tmp_path / "in.jsonl", rows)
    data = fast_job_data(tmp_path, fake.base_url, limits=limits, params={"max_tokens": 60})
    summary = run_job(build_job(data), settings=PoolSettings(flush_seconds=0.2))
    assert summary.rows_ok == len(rows)
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def pace(rows: list[dict[str, Any]], *, since: float = 0.0) -> tuple[int, float]:
    """How many rows finished, and over how many seconds, from a share `since` of the run on."""
    times = sorted(r["finished_at"].timestamp() for r in rows)
    start = times[0] + (times[-1] - times[0]) * since
    finished = [t for t in times if t >= start]
    return len(finished) - 1, finished[-1] - finished[0]


def requests_rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"p{i}"} for i in range(n)]


def test_rpm_budget_equal_to_the_server_limit(tmp_path: Path, fake: FakeServer) -> None:
    """A budget equal to the server's RPM: no 429 and at least 95% of the limit used."""
    window, rpm, n = 2.0, 200, 200
    fake.update(rpm=rpm, window=window, rate_headers=False)
    out = budget_run(tmp_path, fake, requests_rows(n), rpm=rpm, window=window, concurrency=16)
    assert fake.stats()["rate_limited"] == 0
    done, seconds = pace(out)
    assert done / (seconds / window) >= 0.95 * rpm


def test_tpm_budget_equal_to_the_server_limit(tmp_path: Path, fake: FakeServer) -> None:
    """A TPM budget equal to the server's (counted as prompt + max_tokens): no 429, >=95%."""
    window, tpm = 2.0, 48_000
    fake.update(tpm=tpm, window=window, rate_headers=False)
    rows = [{"prompt": "word " * (5 + (i * 37) % 120)} for i in range(300)]
    out = budget_run(
        tmp_path, fake, rows, tpm=tpm, window=window, tpm_counts="max_tokens", concurrency=16
    )
    assert fake.stats()["rate_limited"] == 0
    charged = sorted((r["finished_at"].timestamp(), r["prompt_tokens"] + 60) for r in out)
    seconds = charged[-1][0] - charged[0][0]
    tokens = sum(c for _, c in charged[1:])
    assert tokens / (seconds / window) >= 0.95 * tpm


def test_budget_set_too_high_follows_the_server_headers(tmp_path: Path, fake: FakeServer) -> None:
    """A budget 50% above the server's, with rate headers: every row ok, few 429s, >=90%."""
    window, rpm, n = 2.0, 200, 200
    fake.update(rpm=rpm, window=window, rate_headers=True)
    out = budget_run(tmp_path, fake, requests_rows(n), rpm=rpm * 1.5, window=window, concurrency=16)
    assert fake.stats()["rate_limited"] < 0.02 * n
    done, seconds = pace(out)
    assert done / (seconds / window) >= 0.90 * rpm


def test_adaptive_concurrency_settles_near_the_server_limit(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Against a concurrency-limited server without headers: few 429s, and once settled at
    least 85% of C requests per latency."""
    limit, latency, n = 16, 0.2, 300
    fake.update(max_concurrency=limit, latency=latency, rate_headers=False)
    out = budget_run(tmp_path, fake, requests_rows(n), concurrency=32, start_concurrency=4)
    stats = fake.stats()
    assert stats["rate_limited"] < 0.02 * n
    assert stats["max_in_flight"] <= limit
    done, seconds = pace(out, since=0.5)
    assert done / seconds >= 0.85 * limit / latency, done / seconds / (limit / latency)


# -- the limiter object, on trio with a clock that jumps: a simulated minute takes ms ---------

TRIO = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio")]
)


@TRIO
async def test_a_429_pauses_every_worker(anyio_backend: object) -> None:
    """After a 429 with Retry-After, no worker's next request goes before the delay."""
    import anyio

    limiter = Limiter(concurrency=4, adaptive=False)
    first = await limiter.reserve(prompt_tokens=10, completion_cap=10)
    limiter.settle(first, outcome=Outcome.RATE_LIMITED, retry_after=30.0)
    start = anyio.current_time()
    await limiter.reserve(prompt_tokens=10, completion_cap=10)
    assert anyio.current_time() - start >= 30.0
    assert limiter.statistics().rate_limited == 1


@TRIO
async def test_rpm_paces_a_simulated_minute(anyio_backend: object) -> None:
    """Over a simulated minute, an RPM bucket lets through about its budget, never more."""
    import anyio

    limiter = Limiter(concurrency=8, rpm=120, adaptive=False)
    sent = 0
    start = anyio.current_time()
    while anyio.current_time() - start < 60.0:
        reservation = await limiter.reserve(prompt_tokens=5, completion_cap=5)
        limiter.settle(reservation, outcome=Outcome.OK, prompt_tokens=5, completion_tokens=5)
        sent += 1
    assert 0.95 * 120 <= sent <= 120


@TRIO
async def test_cancelled_wait_gives_its_slot_back(anyio_backend: object) -> None:
    """A task cancelled while waiting for the budget leaves no slot taken."""
    import anyio

    limiter = Limiter(concurrency=1, adaptive=False)
    limiter.pause(100.0)
    with anyio.move_on_after(1.0):
        await limiter.reserve(prompt_tokens=1, completion_cap=1)
    assert limiter.statistics().in_flight == 0
    limiter._paused_until = 0.0
    with anyio.fail_after(1.0):
        reservation = await limiter.reserve(prompt_tokens=1, completion_cap=1)
    limiter.settle(reservation, outcome=Outcome.OK, prompt_tokens=1, completion_tokens=1)


@TRIO
async def test_cancelled_reservation_gives_back_its_slot_request_and_tokens(
    anyio_backend: object,
) -> None:
    """A reservation never sent is returned whole: the next request does not wait for it."""
    import anyio

    limiter = Limiter(concurrency=1, rpm=60, tpm=6000, adaptive=False)
    first = await limiter.reserve(prompt_tokens=30, completion_cap=30)
    limiter.cancel(first)
    assert limiter.statistics().in_flight == 0
    assert limiter.statistics().reserved_tokens == 0
    start = anyio.current_time()
    await limiter.reserve(prompt_tokens=30, completion_cap=30)
    assert anyio.current_time() - start < 0.01


@TRIO
async def test_oversized_request_is_sent_alone_and_logged(anyio_backend: object) -> None:
    """A request larger than the whole TPM budget goes once the bucket is full, with a log."""
    from structlog.testing import capture_logs

    limiter = Limiter(concurrency=2, tpm=1000, adaptive=False)
    with capture_logs() as logs:
        reservation = await limiter.reserve(prompt_tokens=5000, completion_cap=100)
    limiter.settle(reservation, outcome=Outcome.OK, prompt_tokens=5000, completion_tokens=10)
    assert any(entry["event"] == "request_larger_than_tpm" for entry in logs)


@TRIO
async def test_usage_counting_reserves_a_percentile_and_settles_real_usage(
    anyio_backend: object,
) -> None:
    """Once answers come back, a request reserves the 95th percentile of completions seen
    (not its max_tokens), and unused tokens return to the bucket when it settles."""
    limiter = Limiter(concurrency=4, tpm=100_000, adaptive=False, tpm_counts="usage")
    assert limiter.completion_allowance(1000) == COMPLETION_PRIOR  # nothing seen yet: a prior
    for size in range(1, 101):  # completions of 1..100 tokens
        reservation = await limiter.reserve(prompt_tokens=10, completion_cap=1000)
        limiter.settle(reservation, outcome=Outcome.OK, prompt_tokens=10, completion_tokens=size)
    allowance = limiter.completion_allowance(1000)
    assert 60 <= allowance <= 100  # a high percentile of 1..100 (refreshed every 50 answers)
    assert limiter.completion_allowance(50) == 50  # never above the request's own cap
    assert limiter.tokens is not None
    reservation = await limiter.reserve(prompt_tokens=10, completion_cap=1000)
    assert reservation.tokens == 10 + allowance
    level = limiter.tokens.level
    limiter.settle(reservation, outcome=Outcome.OK, prompt_tokens=10, completion_tokens=5)
    # only 15 were used: the rest of the reservation comes back
    assert limiter.tokens.level == pytest.approx(level + reservation.tokens - 15)


@TRIO
async def test_max_tokens_counting_keeps_the_whole_cap_charged(anyio_backend: object) -> None:
    """Against an OpenAI-style server the whole max_tokens stays charged after settling."""
    limiter = Limiter(concurrency=4, tpm=100_000, adaptive=False, tpm_counts="max_tokens")
    assert limiter.tokens is not None
    reservation = await limiter.reserve(prompt_tokens=10, completion_cap=200)
    level = limiter.tokens.level
    limiter.settle(reservation, outcome=Outcome.OK, prompt_tokens=12, completion_tokens=5)
    # the server charged the real prompt (12) plus all of max_tokens (200)
    assert limiter.tokens.level == pytest.approx(level + reservation.tokens - 212)

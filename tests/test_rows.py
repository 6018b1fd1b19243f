"""Work items to result rows: a 429 costs no attempt while the server answers others; a
request answered at once takes the fast path, a failed one the retry policy."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from batchrun.client import Client, Completion
from batchrun.epoch import epoch_us
from batchrun.fake import FakeConfig, FakeServer
from batchrun.job import build_job
from batchrun.limits import LimiterStatistics, Settlement
from batchrun.meter import Attempt
from batchrun.pool import PoolSettings
from batchrun.ratelimit import Lease, LocalRateLimiter, Scope
from batchrun.retry import RetryPolicy
from batchrun.rows import _SET_LAST
from batchrun.runner import run_job
from batchrun.sinks import (
    INDEX_COLUMN,
    PAID_BEFORE_COLUMN,
    USAGE_COLUMNS,
    PartWriter,
    result_column_names,
)
from tests.conftest import ManualClock, fast_job_data, write_jsonl

SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)


def test_a_429_costs_no_attempt_while_others_are_answered(tmp_path: Path, fake: FakeServer) -> None:
    """A server whose RPM window is far below the row count refuses many requests with 429s:
    every row still ends ok on a single attempt (`attempts` counts the requests it sent)."""
    fake.update(rpm=3, window=0.1, rate_headers=False)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(8)])
    data = fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 4, "max_attempts": 1})
    summary = run_job(build_job(data), settings=SETTINGS)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    refused = fake.stats()["rate_limited"]
    assert summary.rows_ok == 8 and refused > 0
    assert sum(row["attempts"] for row in out) == 8 + refused


def test_a_server_refusing_everything_fails_rows_after_outage_timeout(
    tmp_path: Path, fake: FakeServer
) -> None:
    """When no request is answered for `outage_timeout`, 429s count as attempts again and the
    rows end as rate_limit errors instead of waiting for ever."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "[[fault:429*always@0.01]] question"}])
    data = fast_job_data(tmp_path, fake.base_url, limits={"max_attempts": 2, "outage_timeout": 0.1})
    began = time.monotonic()
    summary = run_job(build_job(data), settings=SETTINGS)
    [row] = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows_error == 1 and row["error_class"] == "rate_limit"
    assert time.monotonic() - began < 2.0 and row["attempts"] >= 2


def test_latency_leaves_out_rate_limit_waits(tmp_path: Path, fake: FakeServer) -> None:
    """latency_s sums the time the row's requests took, not the 429 waits between them."""
    rows: list[dict[str, Any]] = [{"prompt": "[[fault:429*2@0.1]] question"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run_job(build_job(fast_job_data(tmp_path, fake.base_url)), settings=SETTINGS)
    [row] = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert row["status"] == "ok" and row["attempts"] == 3
    assert row["latency_s"] < 0.1


def test_concurrency_429s_without_retry_after_cost_no_attempt(tmp_path: Path) -> None:
    """A server allowing one request at a time refuses the rest with 429s and no Retry-After:
    the rows back off on their own and every one ends ok on a single attempt."""
    # a server of its own: requests of earlier tests still open on the session's fake would
    # hold its only slot
    with FakeServer(FakeConfig(max_concurrency=1, latency=0.01)) as fake:
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(8)])
        limits = {"concurrency": 4, "max_attempts": 1}
        data = fast_job_data(tmp_path, fake.base_url, limits=limits)
        summary = run_job(build_job(data), settings=SETTINGS)
        assert summary.rows_ok == 8 and fake.stats()["rate_limited"] > 0


class CountedRetries:
    """Counts the asks that went on to the retry policy (`RetryPolicy.retry`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = RetryPolicy.retry

        async def retry(policy: RetryPolicy, first: Any, attempt: Any) -> Any:
            self.calls += 1
            return await original(policy, first, attempt)

        monkeypatch.setattr(RetryPolicy, "retry", retry)


def test_rows_answered_at_once_never_reach_the_retry_policy(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path: a first request answered 200 is the row's answer straight away, without
    the 429 re-sends or the retry policy (each a coroutine layer at every resumption)."""
    retries = CountedRetries(monkeypatch)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(6)])
    summary = run_job(build_job(fast_job_data(tmp_path, fake.base_url)), settings=SETTINGS)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows_ok == 6 and {row["attempts"] for row in out} == {1}
    assert retries.calls == 0


class _AwaitedLimiter(LocalRateLimiter):
    """A limiter whose `reserve` is its own: it loses `reserves_at_once`, so every attempt
    waits for its lease through `async with` (what Ray's leased limiter does)."""

    async def reserve(self, scope: Scope, *, prompt_tokens: int, completion_cap: int) -> Lease:
        return await super().reserve(
            scope, prompt_tokens=prompt_tokens, completion_cap=completion_cap
        )


@pytest.mark.parametrize(
    ("limiter", "entered"),
    [
        pytest.param(LocalRateLimiter, 0, id="budget-at-hand-no-async-with"),
        pytest.param(_AwaitedLimiter, 6, id="awaited-lease-through-async-with"),
    ],
)
def test_a_first_send_whose_budgets_are_at_hand_is_awaited_by_the_ask_itself(
    tmp_path: Path,
    fake: FakeServer,
    monkeypatch: pytest.MonkeyPatch,
    limiter: type[LocalRateLimiter],
    entered: int,
) -> None:
    """With the budgets at hand, the first send is entered and settled without an `async
    with` (`RowMaker._sending_at_once`); a limiter that must be awaited still goes through
    it, once an attempt. Either way each row is sent, settled and priced once."""
    calls = []
    original = Attempt.__aenter__

    async def aenter(attempt: Attempt) -> Attempt:
        calls.append(attempt)
        return await original(attempt)

    monkeypatch.setattr(Attempt, "__aenter__", aenter)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(6)])
    summary = run_job(
        build_job(fast_job_data(tmp_path, fake.base_url)),
        settings=SETTINGS,
        rate_limiter=limiter.for_limits,
    )
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    stats = summary.statistics
    assert summary.rows_ok == 6 and len(calls) == entered
    assert stats is not None and stats.requests == 6 and stats.in_flight == 0
    assert {row["attempts"] for row in out} == {1}
    assert all(row["cost_usd"] and row["cost_usd"] > 0 for row in out)


class _AwaitedSettleLimiter(LocalRateLimiter):
    """A limiter whose `settle` and `cancel` are its own: it loses `settles_at_once`, so an
    attempt's lease is closed through the awaited, shielded path (as Ray's leased limiter's)."""

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        await super().settle(lease, settlement)

    async def cancel(self, lease: Lease) -> None:
        await super().cancel(lease)


@pytest.mark.parametrize(
    "limiter",
    [
        pytest.param(LocalRateLimiter, id="at-once"),
        pytest.param(_AwaitedLimiter, id="awaited-reserve"),
        pytest.param(_AwaitedSettleLimiter, id="awaited-settle"),
    ],
)
def test_every_lease_is_closed_once_whatever_the_answer(
    tmp_path: Path, fake: FakeServer, limiter: type[LocalRateLimiter]
) -> None:
    """Rows answered at once, refused with a 429 then answered, failed for good (400) and
    retried after a 5xx: whichever way each attempt was entered and settled, the limiter
    ends with no lease open, nothing in flight and no tokens reserved."""
    made: list[LocalRateLimiter] = []

    def keep(limits: Any) -> LocalRateLimiter:
        made.append(limiter.for_limits(limits))
        return made[-1]

    prompts = ["question", "[[fault:429*1@0.01]] q", "[[fault:400]] q", "[[fault:500*1]] q"]
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"{p} {i}"} for i, p in enumerate(prompts)])
    summary = run_job(
        build_job(fast_job_data(tmp_path, fake.base_url)), settings=SETTINGS, rate_limiter=keep
    )
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows_ok == 3 and summary.rows_error == 1 and len(out) == 4
    assert [row["attempts"] for row in out] == [1, 2, 1, 2]  # requests sent
    assert [row["rate_limited"] for row in out] == [0, 1, 0, 0]
    (used,) = made

    async def snapshot() -> LimiterStatistics:  # it reads the loop's clock
        return used.statistics()

    stats = anyio.run(snapshot)
    assert stats.in_flight == 0 and stats.reserved_tokens == 0


@pytest.mark.parametrize(
    ("prompt", "policy_calls", "attempts", "rate_limited"),
    [
        pytest.param("[[fault:500*1]] question", 1, 2, 0, id="5xx-goes-to-the-policy"),
        pytest.param("[[fault:429*1@0.01]] question", 0, 2, 1, id="429-sent-again-in-the-attempt"),
    ],
)
def test_a_failed_first_send_takes_the_slow_path(
    tmp_path: Path,
    fake: FakeServer,
    monkeypatch: pytest.MonkeyPatch,
    prompt: str,
    policy_calls: int,
    attempts: int,
    rate_limited: int,
) -> None:
    """A first send that fails goes on as before the fast path: a 429 is sent again within
    the attempt (no attempt lost), a 5xx is retried by the policy."""
    retries = CountedRetries(monkeypatch)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": prompt}])
    summary = run_job(build_job(fast_job_data(tmp_path, fake.base_url)), settings=SETTINGS)
    [row] = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows_ok == 1 and row["status"] == "ok"
    assert (retries.calls, row["attempts"], row["rate_limited"]) == (
        policy_calls,
        attempts,
        rate_limited,
    )


def test_a_row_failing_every_attempt_records_the_last_error(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Past its first send, a row still runs out of attempts: the error row says why."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "[[fault:500*always]] question"}])
    data = fast_job_data(tmp_path, fake.base_url, limits={"max_attempts": 3})
    summary = run_job(build_job(data), settings=SETTINGS)
    [row] = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows_error == 1 and row["error_class"] == "server"
    assert row["attempts"] == 3


def queued_rows(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The result rows the pool queues for the journal, as it hands them over."""
    written: list[dict[str, Any]] = []
    queue = PartWriter.queue

    def queued(writer: PartWriter, row: dict[str, Any]) -> None:
        written.append(dict(row))
        queue(writer, row)

    monkeypatch.setattr(PartWriter, "queue", queued)
    return written


def answers_sent(monkeypatch: pytest.MonkeyPatch) -> dict[str, Completion]:
    """The answers the client got, by the last message's text."""
    answers: dict[str, Completion] = {}
    send = Client.send

    async def sent(client: Client, body: dict[str, Any]) -> Completion:
        answer = await send(client, body)
        answers[body["messages"][-1]["content"]] = answer
        return answer

    monkeypatch.setattr(Client, "send", sent)
    return answers


def test_a_row_holds_its_times_as_epoch_microseconds_of_the_run_clock(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """started_at and finished_at are epoch microseconds (ints, which the journal writes
    as they are): read from the machine's clock as `time.time_ns` (the fast path), and from
    an injected clock through its `now()` (tests set the time of day); the output file
    holds them as UTC timestamps either way."""
    written = queued_rows(monkeypatch)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "question"}])
    before = time.time_ns() // 1000
    run_job(build_job(fast_job_data(tmp_path, fake.base_url)), settings=SETTINGS)
    [row] = written
    assert type(row["started_at"]) is int and type(row["finished_at"]) is int
    assert before <= row["started_at"] <= row["finished_at"] <= time.time_ns() // 1000
    [out] = pq.read_table(tmp_path / "out.parquet").to_pylist()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert out["finished_at"] == epoch + timedelta(milliseconds=row["finished_at"] // 1000)

    written.clear()
    at = datetime(2026, 12, 1, 5, 6, 7, 891234, tzinfo=UTC)
    (tmp_path / "injected").mkdir()
    data = fast_job_data(tmp_path / "injected", fake.base_url)
    write_jsonl(tmp_path / "injected" / "in.jsonl", [{"prompt": "question"}])
    run_job(build_job(data), settings=dataclasses.replace(SETTINGS, clock=ManualClock(at)))
    [row] = written
    assert row["started_at"] == row["finished_at"] == epoch_us(at)
    [out] = pq.read_table(tmp_path / "injected" / "out.parquet").to_pylist()
    assert out["started_at"] == out["finished_at"] == at.replace(microsecond=891000)


def test_a_result_row_holds_every_result_column(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result row, written out for speed, holds the schema's result columns (the usage
    ones included), ok or error, and the internal ones, each with its value: the answer's
    fields and usage, the row's counts and cost."""
    written, answers = queued_rows(monkeypatch), answers_sent(monkeypatch)
    rows = [{"prompt": "question", "tag": 1}, {"prompt": "[[fault:400*always]] question"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = fast_job_data(tmp_path, fake.base_url, prompt={"carry": ["tag"]})
    summary = run_job(build_job(data), settings=SETTINGS)
    expected = {"id", "tag", INDEX_COLUMN, PAID_BEFORE_COLUMN, *result_column_names()}
    written.sort(key=lambda row: row[INDEX_COLUMN])
    assert [set(row) for row in written] == [expected, expected]
    ok, error = written
    stats = summary.statistics
    assert stats is not None
    answer = answers["question"]
    for name in (*USAGE_COLUMNS, "content", "reasoning_content", "finish_reason", "model"):
        assert ok[name] == getattr(answer, name), name
    assert all(isinstance(ok[name], int) for name in USAGE_COLUMNS[:3])
    assert (ok["response_id"], ok["http_status"]) == (answer.response_id, 200)
    assert (ok[INDEX_COLUMN], ok["id"], ok["tag"], ok["status"]) == (0, "0", 1, "ok")
    assert (ok["attempts"], ok["rate_limited"], ok["error"], ok["error_class"]) == (
        1,
        0,
        None,
        None,
    )
    assert ok["cost_usd"] == stats.cost_usd > 0 and ok["cost_worst_case"] is False
    assert ok["cached"] is False and ok[PAID_BEFORE_COLUMN] == 0.0
    assert 0 < ok["latency_s"] < 5 and 0 <= ok["queued_s"] < 5
    assert ok["started_at"] <= ok["finished_at"]
    assert (error[INDEX_COLUMN], error["id"], error["tag"]) == (1, "1", None)
    assert error["status"] == "error"
    assert all(error[name] is None for name in (*USAGE_COLUMNS, "content", "model"))
    assert (error["http_status"], error["error_class"], error["attempts"]) == (
        400,
        "bad_request",
        1,
    )
    assert error["error"] and error["cost_usd"] is None and error["cost_worst_case"] is False


def test_a_sweep_row_with_parsed_fields_keeps_its_own_cost_columns(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a sweep and parsed fields the row gets its variant's columns and the parsed
    values, and the cost columns (`_SET_LAST`) keep the row's own values. (No parsed field
    can be named like one: the job is refused before it runs.)"""
    written = queued_rows(monkeypatch)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "good phone"}])
    data = fast_job_data(
        tmp_path,
        fake.base_url,
        sweep={"temperature": [0.0, 0.7]},
        params={"response_format": {"type": "json_object"}},
        parse={"fields": {"label": "str", "confidence": "float"}},
    )
    summary = run_job(build_job(data), settings=SETTINGS)
    stats = summary.statistics
    assert summary.rows_ok == 2 and stats is not None
    written.sort(key=lambda row: row[INDEX_COLUMN])
    assert [(row["variant"], row["sweep_temperature"]) for row in written] == [
        ("v1", 0.0),
        ("v2", 0.7),
    ]
    for row in written:
        assert (row["label"], row["confidence"], row["status"]) == ("positive", 0.9, "ok")
        assert row["cost_usd"] > 0 and row["cost_worst_case"] is False
        assert row["cached"] is False and row[PAID_BEFORE_COLUMN] == 0.0
        assert all(name in row for name in _SET_LAST)
    assert sum(row["cost_usd"] for row in written) == pytest.approx(stats.cost_usd)

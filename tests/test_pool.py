"""The pool's money and time: worst-case charges, the spend cap, paid re-asks kept across a
kill, requests counted as sent, and latency measured on the request alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.checkpoint import Checkpoint
from batchrun.cli import cli
from batchrun.client import Client, Completion
from batchrun.errors import BalanceError, CostCapReached
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import RunSummary, run_job
from batchrun.sinks import PartWriter, list_journals, parts_dir, read_journal
from tests.conftest import fast_job_data, write_jsonl

SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)
#: deepseek-chat from 2025-09-29, USD per token
MISS, OUTPUT = 0.28 / 1e6, 0.42 / 1e6


def run(tmp_path: Path, fake: FakeServer, rows: list[dict[str, Any]], **extra: Any) -> RunSummary:
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = build_job(fast_job_data(tmp_path, fake.base_url, **extra))
    return run_job(job, settings=SETTINGS)


def output(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def bytes_at_most(body: dict[str, Any]) -> int:
    """Prompt tokens at most of a plain request: 4 per message plus its bytes."""
    return sum(4 + len(m["content"].encode()) for m in body["messages"])


def test_answer_without_usage_costs_its_worst_case(tmp_path: Path, fake: FakeServer) -> None:
    """Against a proxy that strips usage, cost_usd is the request's worst case, marked so."""
    fake.update(usage="omit")
    run(tmp_path, fake, [{"prompt": "hello"}], params={"max_tokens": 100})
    [row] = output(tmp_path)
    [body] = fake.requests()
    assert row["status"] == "ok" and row["prompt_tokens"] is None
    assert row["cost_usd"] == pytest.approx(bytes_at_most(body) * MISS + 100 * OUTPUT)
    assert row["cost_worst_case"] is True


def test_answer_with_usage_is_not_marked_worst_case(tmp_path: Path, fake: FakeServer) -> None:
    """An answer whose usage came back costs its usage, and cost_worst_case is false."""
    run(tmp_path, fake, [{"prompt": "hello"}], params={"max_tokens": 100})
    [row] = output(tmp_path)
    assert row["cost_worst_case"] is False
    assert row["cost_usd"] == pytest.approx(
        row["prompt_tokens"] * MISS + row["completion_tokens"] * OUTPUT
    )


def test_max_cost_trips_when_the_server_reports_no_usage(tmp_path: Path, fake: FakeServer) -> None:
    """--max-cost holds against a proxy that strips usage: answers count at their worst case."""
    fake.update(usage="omit")
    worst = (4 + len("question 0")) * MISS + 1000 * OUTPUT
    with pytest.raises(CostCapReached):
        run(
            tmp_path,
            fake,
            [{"prompt": f"question {i}"} for i in range(10)],
            params={"max_tokens": 1000},
            max_cost=worst * 3.5,
        )
    assert fake.stats()["requests"] == 3


def test_paid_answers_of_a_re_asked_row_survive_a_kill_between_asks(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Killed (-9) while a row that did not parse waits to be re-asked: its paid answer is in
    the journal, counted in spent_usd, and counted once when the row is later re-asked."""
    write_jsonl(tmp_path / "in.jsonl", [{"rid": "x", "text": "plain"}])
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "in.jsonl"\noutput = "out.parquet"\nbase_url = "{fake.base_url}"\n'
        '[prompt]\nid_column = "rid"\ntemplate = "Review: {text}"\n'
        '[parse]\nparse_attempts = 1\nfields = { label = "str" }\n'
    )
    # an rpm budget of 2 a minute: the first ask goes at once, the re-ask waits a minute
    command = [sys.executable, "-m", "batchrun", "run", str(job), "--rpm", "2", "-q"]
    directory = parts_dir(tmp_path / "out.parquet")
    with subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.DEVNULL) as process:
        try:
            deadline = time.monotonic() + 10
            while not any(read_journal(j) for j in list_journals(directory)):
                assert process.poll() is None, "the run ended too soon"
                assert time.monotonic() < deadline, "the paid answer never reached the journal"
                time.sleep(0.01)
        finally:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert fake.stats()["requests"] == 1
    [journaled] = [row for j in list_journals(directory) for row in read_journal(j)]
    assert journaled["content"] == "echo: Review: plain" and journaled["cost_usd"] > 0

    result = CliRunner().invoke(cli, ["run", str(job)])  # both asks again, no budget
    assert result.exit_code == 1, result.output
    assert fake.stats()["requests"] == 3
    [row] = output(tmp_path)
    spent = Checkpoint(tmp_path / "out.parquet").resume_state(rows=1).spent_usd
    assert row["attempts"] == 2
    assert spent == pytest.approx(journaled["cost_usd"] + row["cost_usd"])


def test_summary_counts_only_requests_sent(tmp_path: Path, fake: FakeServer) -> None:
    """Workers waiting for the rpm budget when the run stops send nothing and count nothing."""
    fake.update(token_budget=0)  # every request: 402, which stops the run
    with pytest.raises(BalanceError) as stopped:
        run(
            tmp_path,
            fake,
            [{"prompt": f"question {i}"} for i in range(8)],
            limits={"rpm": 10, "window": 1.0},
        )
    summary = stopped.value.summary
    assert summary is not None and summary.statistics is not None
    assert summary.statistics.requests == fake.stats()["requests"] == 1


def summary_lines(tmp_path: Path, fake: FakeServer) -> str:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}, {"prompt": "again"}])
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.parquet")]
    result = CliRunner().invoke(cli, [*args, "--base-url", fake.base_url, "--max-tokens", "50"])
    assert result.exit_code == 0, result.output
    return result.output


def test_summary_says_not_reported_for_cache_figures_never_sent(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A proxy without the cache split: the summary says "not reported", not 0."""
    fake.update(usage="no_cache")
    text = summary_lines(tmp_path, fake)
    assert "(cache hit not reported, cache miss not reported)" in text
    assert "(reasoning not reported)" in text


def test_summary_of_a_run_where_no_row_finished_says_none_not_unreported(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A wrong path (every answer a 404 page) stops the run before any row finishes: no
    figure was kept back by the server, so the tokens are "none", not "not reported"."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.parquet")]
    result = CliRunner().invoke(cli, [*args, "--base-url", fake.base_url + "/wrong/path"])
    assert result.exit_code == 3, result.output
    assert "this run: 0 rows" in result.output
    assert "tokens: none (no row finished in this run)" in result.output
    assert "not reported" not in result.output


def test_summary_of_answers_without_usage_is_an_upper_bound(
    tmp_path: Path, fake: FakeServer
) -> None:
    """No usage at all: tokens are not reported, and the cost is shown as at most its worst
    case."""
    fake.update(usage="omit")
    text = summary_lines(tmp_path, fake)
    out = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert "tokens: prompt not reported" in text
    cost = sum(r["cost_usd"] for r in out)
    assert f"cost: at most ${cost:.6f} (2 rows had answers without usage" in text


def test_latency_measures_the_request_and_queued_s_the_wait(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Under an rpm budget, latency_s is the answer's time alone; queued_s holds the wait for
    the budget, and started_at is when the request left."""
    fake.update(latency=0.02)
    run(
        tmp_path,
        fake,
        [{"prompt": f"question {i}"} for i in range(4)],
        limits={"concurrency": 4, "rpm": 10, "window": 1.0},
    )
    out = output(tmp_path)
    assert all(0.02 <= r["latency_s"] < 0.15 for r in out)
    assert max(r["queued_s"] for r in out) > 0.25
    assert all(r["finished_at"] - r["started_at"] < timedelta(seconds=0.15) for r in out)


def test_cached_answer_has_no_latency(tmp_path: Path, fake: FakeServer) -> None:
    """A row served from the request cache sent nothing: latency_s and queued_s are null."""
    rows = [{"prompt": "same"}]
    run(tmp_path, fake, rows, cache=str(tmp_path / "cache"))
    (tmp_path / "out.parquet").unlink()
    run(tmp_path, fake, rows, cache=str(tmp_path / "cache"), output=str(tmp_path / "o2.parquet"))
    [row] = pq.read_table(tmp_path / "o2.parquet").to_pylist()
    assert row["cached"] is True
    assert row["latency_s"] is None and row["queued_s"] is None and row["attempts"] == 0


def test_worst_case_counts_tool_and_response_schemas() -> None:
    """Tools and a response_format schema raise a request's prompt bound by at least their
    size: the server renders them into the prompt and bills them."""
    from batchrun import tokens

    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"a": "x" * 500}}}]
    schema = {"type": "json_schema", "json_schema": {"schema": {"b": "y" * 300}}}
    bare = tokens.prompt_tokens_at_most(body)
    full = tokens.prompt_tokens_at_most({**body, "tools": tools, "response_format": schema})
    assert full >= bare + len(orjson.dumps(tools)) + len(orjson.dumps(schema))
    assert tokens.prompt_tokens({**body, "tools": tools}) > tokens.prompt_tokens(body) + 150


def test_streamed_answer_without_usage_costs_its_worst_case(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A stream whose chunks carry no usage is charged at its worst case too."""
    fake.update(usage="omit")
    run(tmp_path, fake, [{"prompt": "hello"}], stream=True, params={"max_tokens": 100})
    [row] = output(tmp_path)
    [body] = fake.requests()
    assert row["status"] == "ok" and row["content"] == "echo: hello"
    assert row["cost_usd"] == pytest.approx(bytes_at_most(body) * MISS + 100 * OUTPUT)
    assert row["cost_worst_case"] is True


def test_workers_start_with_the_limiter_concurrency_not_the_ceiling(
    tmp_path: Path, fake: FakeServer
) -> None:
    """With adaptive concurrency starting at 4 under a 2,500 ceiling, the pool starts workers
    for what the limiter lets go (and a few more), not a task for each of 2,500 slots."""
    limits = {"concurrency": 2500, "start_concurrency": 4}
    summary = run(tmp_path, fake, [{"prompt": f"q{i}"} for i in range(20)], limits=limits)
    stats = summary.statistics
    assert summary.complete and stats is not None and stats.rows_ok == 20
    assert 4 < stats.workers < 100


def test_workers_grow_with_the_limiter_concurrency(tmp_path: Path, fake: FakeServer) -> None:
    """As adaptive concurrency grows on clean answers, the pool starts more workers: the
    limiter's concurrency, not the first count of workers, bounds what is in flight."""
    fake.update(latency=0.01)
    limits = {"concurrency": 300, "start_concurrency": 4}
    summary = run(tmp_path, fake, [{"prompt": f"q{i}"} for i in range(300)], limits=limits)
    stats = summary.statistics
    assert summary.complete and stats is not None and stats.rows_ok == 300
    assert 4 + 8 < stats.workers <= 300


def test_a_fixed_concurrency_starts_every_worker_at_once(tmp_path: Path, fake: FakeServer) -> None:
    """Without adaptive concurrency the limiter allows `concurrency` from the start, and the
    pool starts that many workers (no more: the job's concurrency is the ceiling)."""
    limits = {"concurrency": 12, "adaptive": False}
    summary = run(tmp_path, fake, [{"prompt": f"q{i}"} for i in range(30)], limits=limits)
    stats = summary.statistics
    assert summary.complete and stats is not None and stats.workers == 12


def test_a_part_is_written_once_the_journal_holds_flush_bytes(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The journal's size makes a part too, long before `flush_rows` or `flush_seconds` would:
    long rows do not pile up in memory (here every write passes the size)."""
    fake.update(latency=0.03)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(8)])
    job = build_job(fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 1}))
    settings = PoolSettings(flush_rows=1000, flush_bytes=1, flush_seconds=60)
    parts: list[int] = []
    original = PartWriter.write_part

    def write_part(writer: PartWriter, path: Path, rows: list[dict[str, Any]]) -> None:
        parts.append(len(rows))
        original(writer, path, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PartWriter, "write_part", write_part)
        summary = run_job(job, settings=settings)
    assert summary.complete and sum(parts) == 8 and len(parts) >= 3


def test_parts_go_to_a_worker_thread_but_the_last_one_of_the_run(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A part written while requests are in flight is written in a worker thread (the loop
    goes on serving them); the run's last part, with every worker done, in the loop's own
    thread, without the hop."""
    fake.update(latency=0.03)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(5)])
    job = build_job(fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 1}))
    settings = PoolSettings(flush_rows=2, flush_seconds=60)
    threads: list[threading.Thread] = []
    original = PartWriter.write_part

    def write_part(writer: PartWriter, path: Path, rows: list[dict[str, Any]]) -> None:
        threads.append(threading.current_thread())
        original(writer, path, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PartWriter, "write_part", write_part)
        summary = run_job(job, settings=settings)
    assert summary.complete and len(threads) >= 2
    assert threading.main_thread() not in threads[:-1]
    assert threads[-1] is threading.main_thread()


def test_rows_finishing_in_one_turn_of_the_loop_are_one_journal_write(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers whose answers come back in the same turn of the event loop journal their rows
    in one write: each queues its row and yields once, and the first back writes them all.
    (The answers are held until all 8 are in, then released together.)"""
    count, arrived = 8, []
    released: list[anyio.Event] = []
    original = Client.send

    async def send(client: Client, body: dict[str, Any]) -> Completion:
        answer = await original(client, body)
        if not released:
            released.append(anyio.Event())
        arrived.append(answer)
        if len(arrived) == count:
            released[0].set()
        await released[0].wait()
        return answer

    monkeypatch.setattr(Client, "send", send)
    limits = {"concurrency": count, "adaptive": False}
    summary = run(tmp_path, fake, [{"prompt": f"q{i}"} for i in range(count)], limits=limits)
    stats = summary.statistics
    assert summary.rows_ok == count and stats is not None and stats.journal_writes == 1


def test_queued_s_counts_the_wait_for_a_worker(tmp_path: Path, fake: FakeServer) -> None:
    """Workers start as the limiter's concurrency grows, so rows wait for a worker in the
    pool's stream: `queued_s` counts from when the row was handed on (here all 60 at the
    start), not from when a worker took it."""
    fake.update(latency=0.05)
    limits = {"concurrency": 60, "start_concurrency": 2}
    run(tmp_path, fake, [{"prompt": f"q{i}"} for i in range(60)], limits=limits)
    rows = output(tmp_path)
    sent = [row["started_at"].timestamp() for row in rows]
    handed = [at - row["queued_s"] for at, row in zip(sent, rows, strict=True)]
    assert max(sent) - min(sent) > 0.2  # late rows waited for a worker
    assert max(handed) - min(handed) < 0.1

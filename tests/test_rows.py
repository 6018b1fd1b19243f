"""Work items to result rows: a 429 costs no attempt while the server answers others."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batchrun.fake import FakeConfig, FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from tests.conftest import fast_job_data, write_jsonl

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

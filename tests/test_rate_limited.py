"""The `rate_limited` column: the 429s a row met, kept through a checkpoint written before it
existed, and marked on the report page's throughput chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import cli
from batchrun.errors import BalanceError
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from batchrun.sinks import list_parts, parts_dir, write_atomically
from tests.conftest import fast_job_data, write_jsonl

SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def test_a_row_that_met_two_429s_then_succeeded_counts_two(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A row refused twice with 429 before its answer has `rate_limited == 2` (the re-sends
    cost no attempt); a row never refused has 0."""
    rows = [{"prompt": "[[fault:429*2@0.01]] question"}, {"prompt": "plain question"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = fast_job_data(tmp_path, fake.base_url, limits={"max_attempts": 1})
    run_job(build_job(data), settings=SETTINGS)
    limited, plain = output_rows(tmp_path)
    assert (limited["status"], limited["attempts"], limited["rate_limited"]) == ("ok", 3, 2)
    assert (plain["status"], plain["attempts"], plain["rate_limited"]) == ("ok", 1, 0)


def test_a_row_failed_by_429s_counts_every_one(tmp_path: Path, fake: FakeServer) -> None:
    """A row refused until it fails (nothing else answered) counts each 429 it met, across
    its attempts: as many as it sent."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "[[fault:429*always@0.01]] question"}])
    data = fast_job_data(tmp_path, fake.base_url, limits={"max_attempts": 2, "outage_timeout": 0.1})
    run_job(build_job(data), settings=SETTINGS)
    [row] = output_rows(tmp_path)
    assert row["error_class"] == "rate_limit" and row["attempts"] >= 2
    assert row["rate_limited"] == row["attempts"]


def drop_rate_limited(output: Path) -> int:
    """Rewrite every part file of `output`'s checkpoint without the `rate_limited` column, as
    the code before it wrote them; returns how many rows they hold."""
    rows = 0
    for part in list_parts(parts_dir(output)):
        table = pq.read_table(part)
        table = table.drop_columns(["rate_limited"])
        write_atomically(table, part)
        rows += table.num_rows
    return rows


def test_a_checkpoint_from_before_the_column_resumes_and_compacts(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Parts written without `rate_limited` (a stopped run of the previous code) are read by
    report and export, beside parts with it, and compacted on resume: their rows' count is
    null (unknown), the rows asked after the resume have theirs."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(24)])
    output = tmp_path / "out.parquet"
    data = fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 2})
    fake.update(token_budget=60)  # 8 tokens a row: about 8 of the 24
    with pytest.raises(BalanceError):
        run_job(build_job(data), settings=SETTINGS)
    old = drop_rate_limited(output)
    assert 0 < old < 24

    fake.update(token_budget=140)  # some more rows, in parts of the new shape
    with pytest.raises(BalanceError):
        run_job(build_job(data), settings=SETTINGS)
    for command in (["report", "--json"], ["status"]):
        result = invoke(*command, str(output))
        assert result.exit_code == 0, result.output
        assert "partial: " in result.output
    exported = invoke("export", "--format", "jsonl", str(output))
    assert exported.exit_code == 0, exported.output
    partial = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert old < len(partial) < 24
    assert [row["rate_limited"] for row in partial].count(None) == old
    names = list(partial[0])
    assert names.index("rate_limited") == names.index("attempts") + 1  # the order written now

    fake.update(token_budget=None)
    assert run_job(build_job(data), settings=SETTINGS).complete
    rows = output_rows(tmp_path)
    assert len(rows) == 24
    counts = [row["rate_limited"] for row in rows]
    assert counts.count(None) == old and set(counts) == {None, 0}
    assert pq.read_schema(output).field("rate_limited").type == "int32"

"""The `rate_limited` column: the 429s a row met, kept through a checkpoint written before it
existed, and marked on the report page's throughput chart."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import cli
from batchrun.errors import BalanceError
from batchrun.fake import FakeConfig, FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.report import read_report, scan_rows
from batchrun.report_html import render_html, throughput
from batchrun.runner import run_job
from batchrun.sinks import list_parts, parts_dir, write_atomically
from tests.conftest import fast_job_data, write_jsonl

SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


@pytest.fixture(scope="module")
def limited(fake_session: FakeServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of a run whose rows 1, 3 and 5 are refused twice with 429 each before their
    answer, and whose rows 0, 2 and 4 are answered at once."""
    tmp = tmp_path_factory.mktemp("limited")
    fake_session.reset(FakeConfig())
    prompts = [f"[[fault:429*2@0.01]] q{i}" if i % 2 else f"q{i}" for i in range(6)]
    write_jsonl(tmp / "in.jsonl", [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)])
    data = fast_job_data(tmp, fake_session.base_url, limits={"max_attempts": 1})
    run_job(build_job(data), settings=SETTINGS)
    return tmp / "out.parquet"


def test_a_row_that_met_two_429s_then_succeeded_counts_two(limited: Path) -> None:
    """A row refused twice with 429 before its answer has `rate_limited == 2` (the re-sends
    cost no attempt); a row never refused has 0."""
    rows = pq.read_table(limited).to_pylist()
    assert [(r["status"], r["attempts"], r["rate_limited"]) for r in rows] == [
        ("ok", 1, 0),
        ("ok", 3, 2),
    ] * 3


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


def plotted(page: str, chart: str) -> dict[str, Any]:
    """The traces of a chart on the page, by name, as plotly.js is handed them."""
    call = re.search(rf'Plotly\.newPlot\(\s*"{chart}",\s*', page)
    assert call is not None
    traces, _ = json.JSONDecoder().raw_decode(page, call.end())
    return {trace["name"]: trace for trace in traces}


def test_the_throughput_chart_marks_429s_of_rows_that_succeeded(limited: Path) -> None:
    """The page's throughput chart marks the six 429s, though every row ended ok: each row's
    count in the interval it finished in, the bars' intervals."""
    rows = pq.read_table(limited).to_pylist()
    page = render_html(read_report(limited), scan_rows(limited), title="t")
    traces = plotted(page, "chart-0")
    marks, bars = traces["429 answers met"], traces["ok"]
    assert sum(n for n in marks["y"] if n is not None) == 6
    assert marks["x"] == bars["x"]
    data = throughput(scan_rows(limited))
    first, step = data.starts[0], timedelta(seconds=data.interval_s)
    want = Counter[int]()
    for row in rows:
        want[(row["finished_at"] - first) // step] += row["rate_limited"]
    assert marks["y"] == [want[i] or None for i in range(len(bars["x"]))]


def test_report_counts_429s_per_variant(limited: Path) -> None:
    """`report --json` and the table give the 429s met, beside the rows."""
    result = invoke("report", "--json", str(limited))
    assert result.exit_code == 0, result.output
    [figures] = orjson.loads(result.stdout)
    assert (figures["rows"], figures["errors"], figures["rate_limited"]) == (6, 0, 6)
    header, *lines = invoke("report", str(limited)).output.splitlines()
    assert header.split()[:6] == ["variant", "rows", "ok", "errors", "cached", "429s"]
    assert lines[0].split()[:6] == ["all", "6", "6", "0", "0", "6"]

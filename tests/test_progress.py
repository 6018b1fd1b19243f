"""Progress: structured lines off a terminal, and a live display that moves in a terminal."""

from __future__ import annotations

import dataclasses
import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from batchrun.errors import BalanceError
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.progress import RunStatistics, Tally, render
from batchrun.runner import run_job
from batchrun.status import read_status
from tests.conftest import fast_job_data, write_jsonl
from tests.test_cli_errors import to_toml


def test_progress_lines_without_a_terminal(tmp_path: Path, fake: FakeServer) -> None:
    """Off a terminal, the run logs progress events whose counts move up to the total."""
    fake.update(latency=0.02)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    job = build_job(fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 2}))
    with capture_logs() as logs:
        run_job(job, settings=PoolSettings(display="lines", progress_every=0.05))
    lines = [entry for entry in logs if entry["event"] == "progress"]
    done = [entry["done"] for entry in lines]
    assert len(lines) >= 3 and done == sorted(done) and done[0] < done[-1] <= 30
    assert all(entry["total"] == 30 for entry in lines)
    assert {"requests_per_s", "spent_usd", "projected_usd", "eta_s", "concurrency"} <= set(
        lines[-1]
    )


def run_in_terminal(*args: str) -> tuple[int, bytes]:
    """`batchrun ARGS` in a pseudo-terminal: its exit code and what it showed, without the
    terminal's control sequences."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    return process.wait(timeout=10), re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", output)


def test_live_display_in_a_terminal_shows_counts_that_move(
    tmp_path: Path, fake: FakeServer
) -> None:
    """In a pseudo-terminal, the live display redraws with a growing count of rows done."""
    fake.update(latency=0.03)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    code, plain = run_in_terminal(
        "run", "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url,
        "--concurrency", "2", "--no-adaptive",
    )  # fmt: skip
    assert code == 0, plain[-2000:]
    counts = [int(n) for n in re.findall(rb"rows\s+(\d+)/40", plain)]
    assert counts and counts[-1] == 40, plain[-3000:]
    assert len(set(counts)) >= 3 and counts == sorted(counts)


def test_retry_lines_stay_off_the_display_unless_verbose(tmp_path: Path, fake: FakeServer) -> None:
    """Under the live display, retry log lines are not printed at default verbosity (the
    display's retries line counts them) and are printed with -v."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i} [[fault:500]]"} for i in range(6)])
    job_file = tmp_path / "job.toml"  # backoffs of milliseconds
    job_file.write_text(to_toml(fast_job_data(tmp_path, fake.base_url)), encoding="utf-8")
    args = ["run", str(job_file), "--concurrency", "2", "--no-adaptive"]
    code, plain = run_in_terminal(*args)
    assert code == 0, plain[-2000:]
    assert b"request_retried" not in plain
    assert re.search(rb"retries\s+server 6", plain), plain[-2000:]
    # new prompts: the fake's scripted faults fire once per prompt
    write_jsonl(tmp_path / "v.jsonl", [{"prompt": f"v{i} [[fault:500]]"} for i in range(6)])
    more = ["--input", str(tmp_path / "v.jsonl"), "--output", str(tmp_path / "v.parquet")]
    code, verbose = run_in_terminal(*args, "-v", *more)
    assert code == 0, verbose[-2000:]
    assert verbose.count(b"request_retried") == 6, verbose[-2000:]


def test_summary_figures_match_the_output_file(tmp_path: Path, fake: FakeServer) -> None:
    """The closing summary's rows, tokens and cost are the sums of the output file."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from batchrun.cli import cli

    system = "You are a careful assistant. " * 40
    rows = [{"prompt": f"p{i}"} for i in range(6)] + [{"prompt": "[[fault:400*always]]"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.parquet")]
    args += ["--base-url", fake.base_url, "--system", system, "--model", "deepseek-reasoner"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    out = pq.read_table(tmp_path / "o.parquet").to_pylist()

    def total(column: str) -> int:
        return sum(r[column] or 0 for r in out)

    text = result.output
    assert "complete: 6 ok, 1 errors of 7 rows" in text
    assert (
        f"tokens: prompt {total('prompt_tokens')} (cache hit {total('prompt_cache_hit_tokens')}, "
        f"cache miss {total('prompt_cache_miss_tokens')}), completion "
        f"{total('completion_tokens')} (reasoning {total('reasoning_tokens')})"
    ) in text
    assert total("prompt_cache_hit_tokens") > 0 and total("reasoning_tokens") > 0
    assert f"cost: ${sum(r['cost_usd'] or 0 for r in out):.6f}" in text
    assert "errors by class: bad_request 1" in text


def rendered(stats: RunStatistics) -> str:
    """The live display of `stats` as the terminal shows it, as text."""
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(stats))
    return console.export_text()


def display_counts(stats: RunStatistics) -> tuple[int, int, int]:
    """rows done, ok, errors as the display shows them."""
    match = re.search(r"rows\s+(\d+)/\d+ \(\d+%\)\s+ok (\d+)\s+errors (\d+)", rendered(stats))
    assert match, rendered(stats)
    return int(match[1]), int(match[2]), int(match[3])


def test_display_after_a_resume_counts_the_whole_job(tmp_path: Path, fake: FakeServer) -> None:
    """Resumed runs show the whole job's rows, ok and errors (earlier runs' too), equal to
    status while stopped and to the closing summary when complete."""
    rows = [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(30)]
    for i in (1, 4):
        rows[i]["prompt"] = "[[fault:400*always]]"
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = build_job(fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 2}))
    settings = PoolSettings(flush_rows=5, flush_seconds=0.05)
    fake.update(token_budget=100)  # 8 tokens an ok row: a dozen rows, then 402
    with pytest.raises(BalanceError):
        run_job(job, settings=settings)
    fake.update(token_budget=0)  # the resumed run stops at its first request
    with pytest.raises(BalanceError) as again:
        run_job(job, settings=settings)
    status = read_status(job.output)
    assert 0 < status.rows_done < 30 and status.rows_error == 2
    summary = again.value.summary
    assert summary is not None and summary.statistics is not None
    expected = (status.rows_done, status.rows_ok, status.rows_error)
    assert display_counts(summary.statistics) == expected
    assert (summary.rows_ok, summary.rows_error) == expected[1:]

    fake.update(token_budget=None)
    summary = run_job(job, settings=settings)
    assert summary.statistics is not None and summary.statistics.rows_skipped > 0
    assert display_counts(summary.statistics) == (30, 28, 2)
    assert (summary.rows_ok, summary.rows_error) == (28, 2)


def test_display_labels_stay_aligned_when_retries_appear() -> None:
    """Every line's figures start in the same column, with or without the retries line."""
    quiet = Tally(rows_total=10, rows_done=3, rows_ok=3).statistics()
    busy = dataclasses.replace(quiet, retries_by_class={"rate_limit": 4})
    label = re.compile(r"^\s*(rows|rate|cost|eta|pool|retries)  (\S)", re.MULTILINE)
    columns = {m.start(2) - m.start(0) for s in (quiet, busy) for m in label.finditer(rendered(s))}
    assert "retries" in rendered(busy) and len(columns) == 1

"""Progress: structured lines off a terminal, and a live display that moves in a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from structlog.testing import capture_logs

from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from tests.conftest import fast_job_data, write_jsonl


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


def test_live_display_in_a_terminal_shows_counts_that_move(
    tmp_path: Path, fake: FakeServer
) -> None:
    """In a pseudo-terminal, the live display redraws with a growing count of rows done."""
    fake.update(latency=0.03)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "batchrun", "run", "--input", str(tmp_path / "in.jsonl")]
    command += ["--base-url", fake.base_url, "--concurrency", "2", "--no-adaptive"]
    process = subprocess.Popen(
        command,
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
    assert process.wait(timeout=10) == 0, output[-2000:]
    plain = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", output)
    counts = [int(n) for n in re.findall(rb"rows\s+(\d+)/40", plain)]
    assert counts and counts[-1] == 40, output[-3000:]
    assert len(set(counts)) >= 3 and counts == sorted(counts)


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

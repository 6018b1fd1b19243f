"""Checkpointed resume: kills, signals, fingerprints, error rows, status, the run lock.

Kill and signal tests run the real command in a subprocess against the session's fake;
the resume after them runs in this process, through click's CliRunner.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from click.testing import CliRunner, Result

from batchrun.checkpoint import Checkpoint
from batchrun.cli import cli
from batchrun.errors import BalanceError
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from batchrun.sinks import PartWriter, list_journals, list_parts, parts_dir
from batchrun.status import read_status
from tests.conftest import fast_job_data, write_jsonl
from tests.test_runner import prompts, run


def cli_args(tmp_path: Path, fake: FakeServer, *extra: str) -> list[str]:
    """`batchrun run` arguments over tmp_path/in.jsonl, with ids from the `id` column."""
    return [
        "run",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.parquet"),
        "--base-url",
        fake.base_url,
        "--id-column",
        "id",
        "-q",
        *extra,
    ]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def start_run(tmp_path: Path, fake: FakeServer, *extra: str) -> subprocess.Popen[str]:
    """`python -m batchrun run ...` in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *cli_args(tmp_path, fake, *extra)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_requests(
    fake: FakeServer,
    count: int,
    process: subprocess.Popen[str] | None,
    *,
    prefix: str | None = None,
) -> None:
    """Wait until the fake has received `count` chat requests in all, or `count` whose
    prompt starts with `prefix`."""

    def received() -> int:
        if prefix is None:
            return int(fake.stats()["requests"])
        return sum(n for p, n in sent_prompts(fake).items() if p.startswith(prefix))

    deadline = time.monotonic() + 30
    while received() < count:
        assert process is None or process.poll() is None, "the run ended too soon"
        assert time.monotonic() < deadline, "the run sent too few requests"
        time.sleep(0.005)


def sent_prompts(fake: FakeServer, since: int = 0) -> Counter[str]:
    return Counter(body["messages"][-1]["content"] for body in fake.requests()[since:])


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def test_sigkill_at_random_moments_loses_nothing_and_repays_only_in_flight_requests(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Killed (-9) three times at seeded random moments and resumed: every row once, each
    with its own answer, and no more repeated requests than were in flight at the kills."""
    rows, concurrency, kills = 80, 4, 3
    write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    fake.update(latency=0.02)
    rng = random.Random(4)
    for _ in range(kills):
        sent = fake.stats()["requests"]
        with start_run(tmp_path, fake, "--concurrency", str(concurrency)) as process:
            wait_for_requests(fake, sent + rng.randint(8, 20), process)
            time.sleep(rng.uniform(0, 0.02))
            process.kill()
        assert process.returncode == -signal.SIGKILL
        # nothing was flushed in so short a run: what it did is in the journal alone
        assert list_journals(parts_dir(tmp_path / "out.parquet"))
    fake.update(latency=0.0)
    result = invoke(*cli_args(tmp_path, fake, "--concurrency", "16"))
    assert result.exit_code == 0, result.output
    out = output_rows(tmp_path)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(rows)]
    assert all(r["content"] == f"echo: question {r['id'][1:]}" for r in out)
    counts = sent_prompts(fake)
    assert set(counts) == {f"question {i}" for i in range(rows)}
    assert sum(n - 1 for n in counts.values()) <= concurrency * kills
    assert not parts_dir(tmp_path / "out.parquet").exists()


def test_rows_answered_together_share_one_journal_write(tmp_path: Path, fake: FakeServer) -> None:
    """Rows that finish in the same event-loop turn go to the journal in one write: 40
    answers that come back together take fewer writes than rows, and every row counts."""
    fake.update(latency=0.05)
    summary = run(tmp_path, fake, prompts(40), limits={"concurrency": 40})
    stats = summary.statistics
    assert summary.complete and stats is not None and stats.rows_done == 40
    assert 1 <= stats.journal_writes < 40


def test_sigint_and_sigterm_stop_gracefully_then_the_run_resumes(
    tmp_path: Path, fake: FakeServer
) -> None:
    """SIGINT or SIGTERM: requests in flight finish and are kept, exit 3 saying how to
    resume; the next run completes without paying for any row twice. (One run per signal,
    side by side, to share the start-up time.)"""
    fake.update(latency=0.1)
    signals = (signal.SIGINT, signal.SIGTERM)
    with contextlib.ExitStack() as stack:
        runs = {}
        for signum in signals:
            folder = tmp_path / signum.name
            folder.mkdir()
            write_jsonl(folder / "in.jsonl", prompts(30, signum.name))
            runs[signum] = stack.enter_context(start_run(folder, fake, "--concurrency", "3"))
        for signum, process in runs.items():
            wait_for_requests(fake, 3, process, prefix=signum.name)
            process.send_signal(signum)
        for signum, process in runs.items():
            _, stderr = process.communicate(timeout=30)
            assert process.returncode == 3, stderr
            assert f"stopped by {signum.name}: run the same command again to resume" in stderr

    for signum in signals:
        folder = tmp_path / signum.name
        kept = read_status(folder / "out.parquet")
        assert kept.rows_ok >= 3 and kept.active_pid is None
        assert not list_journals(parts_dir(folder / "out.parquet"))  # all in part files
    fake.update(latency=0.0)
    for signum in signals:
        folder = tmp_path / signum.name
        result = invoke(*cli_args(folder, fake))
        assert result.exit_code == 0, result.output
        assert [r["id"] for r in output_rows(folder)] == [f"r{i}" for i in range(30)]
    counts = sent_prompts(fake)
    assert len(counts) == 60 and set(counts.values()) == {1}


def test_changed_job_is_refused_naming_the_change_and_restart_starts_over(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A checkpoint made by another model is refused (exit 2, naming the change);
    --restart throws it away and sends every row again."""
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    assert invoke(*cli_args(tmp_path, fake, "--limit", "3")).exit_code == 0
    changed = invoke(*cli_args(tmp_path, fake, "--model", "deepseek-reasoner"))
    assert changed.exit_code == 2
    assert "model: 'deepseek-flash' -> 'deepseek-reasoner'" in changed.output
    assert "--restart" in changed.output
    sent = len(fake.requests())
    restarted = invoke(*cli_args(tmp_path, fake, "--model", "deepseek-reasoner", "--restart"))
    assert restarted.exit_code == 0, restarted.output
    again = fake.requests()[sent:]
    assert len(again) == 6 and {body["model"] for body in again} == {"deepseek-reasoner"}
    assert {r["model"] for r in output_rows(tmp_path)} == {"deepseek-reasoner"}


def test_error_rows_are_sent_again_on_the_next_run(tmp_path: Path, fake: FakeServer) -> None:
    """A row that ended as an error is retried by the next run; ok rows are not."""
    rows = [{"id": "a", "prompt": "fine"}, {"id": "b", "prompt": "flaky [[fault:500*2]]"}]
    first = run(tmp_path, fake, rows, prompt={"id_column": "id"}, limits={"max_attempts": 1})
    assert first.complete and first.rows_error == 1 and first.exit_code == 1
    assert output_rows(tmp_path)[1]["error_class"] == "server"
    sent = len(fake.requests())
    second = run(tmp_path, fake, rows, prompt={"id_column": "id"})
    assert second.complete and second.exit_code == 0
    assert sent_prompts(fake, sent) == {"flaky [[fault:500*2]]": 2}
    assert [r["status"] for r in output_rows(tmp_path)] == ["ok", "ok"]
    assert not parts_dir(tmp_path / "out.parquet").exists()


def journal_row(index: int, **fields: Any) -> dict[str, Any]:
    """A result row as the pool hands it to the writer."""
    now = datetime.now(UTC)
    row: dict[str, Any] = {"id": f"r{index}", "_index": index, "status": "ok", "attempts": 1}
    row |= {"content": f"echo: question {index}", "prompt_tokens": 5, "completion_tokens": 7}
    row |= {"latency_s": 0.01, "http_status": 200, "started_at": now, "finished_at": now}
    return row | fields


def test_status_of_a_stopped_checkpoint(tmp_path: Path, fake: FakeServer) -> None:
    """status counts part files and the journal a killed run left: done, ok, errors by
    class, remaining, tokens, and no run active."""
    rows = prompts(10)
    rows[2]["prompt"] = "[[fault:400*always]]"
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert invoke(*cli_args(tmp_path, fake, "--limit", "6")).exit_code == 1
    # then a full run that was killed after two rows
    checkpoint = Checkpoint(tmp_path / "out.parquet")
    checkpoint.record_rows(10, limit=None)
    writer = PartWriter(checkpoint.directory, carried={})
    writer.add(journal_row(6))
    writer.add(journal_row(7, status="error", error_class="timeout", content=None))
    writer.close()
    in_parts = pq.read_table(list_parts(checkpoint.directory))

    result = invoke("status", str(tmp_path / "out.parquet"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "state:   stopped, no run active: run the same command again to resume" in lines
    assert "rows:    8 done of 10: 6 ok, 2 errors; 2 remaining" in lines
    assert "errors:  bad_request 1, timeout 1" in lines
    prompt_tokens = in_parts["prompt_tokens"].to_pylist()
    completion_tokens = in_parts["completion_tokens"].to_pylist()
    prompt = sum(n or 0 for n in prompt_tokens) + 10
    completion = sum(n or 0 for n in completion_tokens) + 14
    assert f"tokens:  {prompt:,} prompt, {completion:,} completion" in lines


def test_status_of_a_finished_output(tmp_path: Path, fake: FakeServer) -> None:
    """status on a finished output reads the file; on nothing at all it exits 2."""
    run(tmp_path, fake, prompts(5))
    out = pq.read_table(tmp_path / "out.parquet")
    result = invoke("status", str(tmp_path / "out.parquet"))
    assert result.exit_code == 0, result.output
    prompt = sum(out["prompt_tokens"].to_pylist())
    completion = sum(out["completion_tokens"].to_pylist())
    assert result.output.splitlines()[1:] == [
        "state:   complete",
        "rows:    5 done of 5: 5 ok, 0 errors; 0 remaining",
        "errors:  none",
        f"tokens:  {prompt:,} prompt, {completion:,} completion",
    ]
    missing = invoke("status", str(tmp_path / "other.parquet"))
    assert missing.exit_code == 2
    assert "nothing here: no checkpoint and no output file" in missing.output


def test_second_run_on_the_same_output_is_refused_while_the_first_is_alive(
    tmp_path: Path, fake: FakeServer
) -> None:
    """While a run is alive (here in a thread of this process), another run on the same
    output, even with --restart, is refused with exit 2, and status names the run's pid.
    (A stale lock left by a killed process is taken over: see the SIGKILL test.)"""
    write_jsonl(tmp_path / "in.jsonl", prompts(20))
    fake.update(latency=0.3)
    data = fast_job_data(tmp_path, fake.base_url, prompt={"id_column": "id"})
    job = build_job(data | {"limits": data["limits"] | {"concurrency": 1}})
    first: list[BaseException] = []

    def run_first() -> None:
        try:
            run_job(job, settings=PoolSettings(stop_grace=2.0))
        except BaseException as exc:  # handed to the test's thread
            first.append(exc)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        wait_for_requests(fake, 1, None)
        second = invoke(*cli_args(tmp_path, fake))
        assert second.exit_code == 2
        assert f"another run (pid {os.getpid()}) is using this output" in second.output
        assert invoke(*cli_args(tmp_path, fake, "--restart")).exit_code == 2
        status = invoke("status", str(tmp_path / "out.parquet"))
        assert f"state:   running (pid {os.getpid()})" in status.output.splitlines()
    finally:
        fake.update(token_budget=0)  # the first run stops at its next request (402)
        thread.join(timeout=30)
    assert [type(exc) for exc in first] == [BalanceError]


def test_torn_temporary_part_and_torn_journal_tail_are_ignored(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A half-written temporary part and a journal whose last line was cut by a kill:
    the temporary is removed, the whole journal lines are kept (not sent again), the cut
    row is sent again, and every row ends in the output once."""
    write_jsonl(tmp_path / "in.jsonl", prompts(10))
    assert invoke(*cli_args(tmp_path, fake, "--limit", "4")).exit_code == 0
    directory = parts_dir(tmp_path / "out.parquet")
    writer = PartWriter(directory, carried={})
    for index in (4, 5, 6):
        writer.add(journal_row(index, response_id="from-journal"))
    writer.close()
    (journal,) = list_journals(directory)
    data = journal.read_bytes()
    journal.write_bytes(data[: data.rindex(b"\n", 0, -1) + 20])  # row 6 cut mid-line
    torn = directory / f".part-000009.parquet.tmp-{2**22 + 1}"
    torn.write_bytes(b"PAR1\x15\x04\x15\x80")
    sent = len(fake.requests())

    result = invoke(*cli_args(tmp_path, fake))
    assert result.exit_code == 0, result.output
    assert sent_prompts(fake, sent) == {f"question {i}": 1 for i in range(6, 10)}
    out = output_rows(tmp_path)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(10)]
    assert [r["response_id"] == "from-journal" for r in out[4:7]] == [True, True, False]
    assert not directory.exists()


def test_second_ctrl_c_cancels_requests_in_flight_at_once(tmp_path: Path, fake: FakeServer) -> None:
    """A second Ctrl-C does not wait out the grace period for slow requests: exit 3 at once."""
    fake.update(latency=20.0)
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    with start_run(tmp_path, fake, "--concurrency", "2", "--no-adaptive") as process:
        wait_for_requests(fake, 2, process)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert process.poll() is None  # the first Ctrl-C waits for requests in flight
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 3, stderr
    assert time.monotonic() - started < 5
    assert "run the same command again to resume" in stderr


def test_lock_left_by_a_dead_run_does_not_block(tmp_path: Path, fake: FakeServer) -> None:
    """A lock file naming a process that is gone (kill -9) does not stop the next run."""
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    directory = parts_dir(tmp_path / "out.parquet")
    directory.mkdir()
    (directory / "lock").write_text('{"pid": 999999999}')
    result = invoke(*cli_args(tmp_path, fake))
    assert result.exit_code == 0, result.output


def test_status_counts_read_with_thousands_separators(tmp_path: Path) -> None:
    """Big counts in `status` carry separators, as the run's summary and `partial:` line do."""
    from batchrun.status import JobStatus, describe

    status = JobStatus(
        output=tmp_path / "out.parquet",
        source="checkpoint",
        rows_total=1_000_000,
        limit=None,
        rows_done=558_000,
        rows_ok=557_000,
        errors_by_class={"server": 1_000},
        prompt_tokens=12_345_678,
        completion_tokens=2_000_000,
        active_pid=None,
    )
    lines = describe(status)
    assert (
        "rows:    558,000 done of 1,000,000: 557,000 ok, 1,000 errors; 442,000 remaining" in lines
    )
    assert "errors:  server 1,000" in lines
    assert "tokens:  12,345,678 prompt, 2,000,000 completion" in lines

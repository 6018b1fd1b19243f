"""report, export and status on a job that stopped: read from its checkpoint, said to be partial."""

from __future__ import annotations

import csv
import io
import re
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import cli
from batchrun.fake import FakeServer
from batchrun.report import scan_rows
from batchrun.sinks import INDEX_COLUMN, list_journals, list_parts, parts_dir, read_journal
from tests.conftest import fast_job_data, write_jsonl
from tests.test_cli_errors import to_toml

PARTIAL = re.compile(r"partial: (\d+) of (\d+) rows; the job is not finished")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def partial_line(result: Result) -> tuple[str, int, int]:
    """The one "partial: ..." line of a command's output, and its two counts."""
    (line,) = [text for text in result.output.splitlines() if text.startswith("partial: ")]
    match = PARTIAL.match(line)
    assert match, line
    return line, int(match[1]), int(match[2])


def stopped_by_402(tmp_path: Path, fake: FakeServer) -> Path:
    """The job file of a sweep of 30 rows x 2 temperatures that the fake stopped with 402."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(30)])
    data = fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 2})
    data["sweep"] = {"temperature": [0.0, 1.0]}
    job_file = tmp_path / "job.toml"
    job_file.write_text(to_toml(data), encoding="utf-8")
    fake.update(token_budget=200)  # 8 tokens a row: about 25 of the 60
    stopped = invoke("run", str(job_file), "-q")
    assert stopped.exit_code == 3, stopped.output
    return job_file


def test_report_export_and_status_of_a_job_stopped_by_402(tmp_path: Path, fake: FakeServer) -> None:
    """A sweep stopped by 402: status, report, CSV and JSONL export say the same partial line
    with the checkpoint's count, give each row done once, and leave the checkpoint as it was."""
    job_file = stopped_by_402(tmp_path, fake)
    checkpoint = parts_dir(tmp_path / "out.parquet")
    positions = pq.read_table(list_parts(checkpoint))[INDEX_COLUMN].to_pylist()
    done = len(set(positions))
    assert 0 < done < 60 and not list_journals(checkpoint)
    before = snapshot(checkpoint)

    status = invoke("status", str(job_file))
    assert status.exit_code == 0, status.output
    line, counted, total = partial_line(status)
    assert (counted, total) == (done, 60)

    report = invoke("report", "--json", str(job_file))
    assert report.exit_code == 0, report.output
    assert report.stderr.splitlines() == [line]
    figures = orjson.loads(report.stdout)
    assert [f["sweep"] for f in figures] == [{"temperature": 0.0}, {"temperature": 1.0}]
    assert sum(f["rows"] for f in figures) == done

    jsonl = invoke("export", "--format", "jsonl", str(tmp_path / "out.parquet"))
    assert jsonl.exit_code == 0, jsonl.output
    assert jsonl.stderr.splitlines() == [line]
    rows = [orjson.loads(text) for text in jsonl.stdout.splitlines()]
    keys = [(row["id"], row["variant"]) for row in rows]
    order = [(f"r{p // 2}", f"v{p % 2 + 1}") for p in sorted(set(positions))]
    assert keys == order  # each position once, in input order
    assert INDEX_COLUMN not in rows[0]

    exported = invoke("export", "--format", "csv", str(tmp_path / "out.parquet"))
    assert exported.exit_code == 0, exported.output
    assert exported.stderr.splitlines() == [line]
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(row["id"], row["variant"]) for row in table] == order
    charted = scan_rows(tmp_path / "out.parquet").select("id", "variant").collect().rows()
    assert charted == order  # what `report --html` charts: the same rows
    assert snapshot(checkpoint) == before


@pytest.mark.skipif(find_spec("plotly") is None, reason="report --html needs batchrun[report]")
def test_html_report_of_a_stopped_job_says_it_is_partial(tmp_path: Path, fake: FakeServer) -> None:
    """`report --html` of a stopped job writes the partial line into the page, which is read
    (and mailed) without the terminal that printed it."""
    job_file = stopped_by_402(tmp_path, fake)
    page = tmp_path / "report.html"
    report = invoke("report", str(job_file), "--html", str(page))
    assert report.exit_code == 0, report.output
    line, done, total = partial_line(report)
    assert 0 < done < total == 60
    assert f'<p class="partial">{line}</p>' in page.read_text(encoding="utf-8")


def test_export_of_a_killed_run_reads_its_journal(tmp_path: Path, fake: FakeServer) -> None:
    """A run killed (SIGKILL) before any part file is written: export and status read the
    rows its journal holds, the same count, each row once."""
    fake.update(latency=0.02)
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(400)])
    output = tmp_path / "out.parquet"
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(output)]
    args += ["--base-url", fake.base_url, "--concurrency", "2", "-q"]
    process = subprocess.Popen([sys.executable, "-m", "batchrun", *args], cwd=tmp_path)
    deadline = time.monotonic() + 30
    journalled: list[dict[str, object]] = []
    while len(journalled) < 5:
        assert process.poll() is None and time.monotonic() < deadline, "no rows journalled"
        time.sleep(0.01)
        journals = list_journals(parts_dir(output))
        journalled = read_journal(journals[0]) if journals else []
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert not list_parts(parts_dir(output))
    journalled = read_journal(list_journals(parts_dir(output))[0])

    status = invoke("status", str(output))
    line, counted, total = partial_line(status)
    assert (counted, total) == (len(journalled), 400)
    result = invoke("export", "--format", "jsonl", str(output))
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [line]
    rows = [orjson.loads(text) for text in result.stdout.splitlines()]
    assert [row["id"] for row in rows] == sorted((str(r["id"]) for r in journalled), key=_number)
    assert all(row["finished_at"].endswith("Z") and "T" in row["finished_at"] for row in rows)


def test_finished_output_says_nothing_partial(tmp_path: Path, fake: FakeServer) -> None:
    """A finished job's report and export print no partial line and read the output file."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(3)])
    output = tmp_path / "out.parquet"
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(output)]
    assert invoke("run", *args, "--base-url", fake.base_url, "-q").exit_code == 0
    ok = pc.sum(pc.equal(pq.read_table(output)["status"], "ok")).as_py()
    report = invoke("report", "--json", str(output))
    assert report.stderr == "" and orjson.loads(report.stdout)[0]["ok"] == ok == 3
    status = invoke("status", str(output))
    assert "partial" not in status.output and "state:   complete" in status.output


def _number(row_id: str) -> int:
    return int(row_id.removeprefix("r"))


def test_a_run_retrying_error_rows_is_read_from_its_checkpoint(
    tmp_path: Path, fake: FakeServer
) -> None:
    """While a run holds the job (retrying the error rows of a written output), export reads
    its checkpoint and says a run is going on, not the output it is about to replace."""
    from batchrun.checkpoint import Checkpoint

    prompts = [f"q{i} [[fault:400]]" if i % 2 else f"q{i}" for i in range(6)]
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    job_file = tmp_path / "job.toml"
    job_file.write_text(to_toml(fast_job_data(tmp_path, fake.base_url)), encoding="utf-8")
    assert invoke("run", str(job_file), "-q").exit_code == 1  # finished, with error rows
    output = tmp_path / "out.parquet"
    assert output.exists() and parts_dir(output).exists()  # error rows keep the checkpoint
    assert invoke("export", str(output), "--format", "jsonl").output.count("\n") == 6
    live = Checkpoint(output)
    live.acquire_lock()  # as a run retrying the errors would
    try:
        during = invoke("export", str(output), "--format", "jsonl")
    finally:
        live.release_lock()
    line, done, total = partial_line(during)
    assert (done, total) == (6, 6) and "a run is going on" in line

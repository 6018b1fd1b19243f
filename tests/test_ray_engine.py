"""`--engine ray` on the shared local Ray instance (127.0.0.1), against the fake."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from batchrun.cli import cli
from batchrun.errors import AuthError
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import RunSummary, run_job
from batchrun.sinks import list_parts, parts_dir, shard_dirs
from batchrun.status import read_status
from tests.conftest import fast_job_data, write_jsonl

ray = pytest.importorskip("ray")  # the `ray` extra; CI installs it

pytestmark = pytest.mark.timeout(120)

#: columns that say when and how fast, which two runs never share
_TIMING = {"latency_s", "queued_s", "started_at", "finished_at", "response_id"}


def _rows(count: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(count)]


def _ray_job(tmp_path: Path, fake: FakeServer, **extra: Any) -> Any:
    data = fast_job_data(tmp_path, fake.base_url, engine="ray", ray={"workers": 2}, **extra)
    return build_job(data)


def _ids(path: Path) -> list[str]:
    return [str(v) for v in pq.read_table(path, columns=["id"])["id"].to_pylist()]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchrun", "run", *args]


@pytest.mark.parametrize(
    "suffix", [pytest.param("jsonl", id="jsonl"), pytest.param("parquet", id="parquet")]
)
def test_output_equals_the_local_engine(
    ray_address: str, fake: FakeServer, tmp_path: Path, suffix: str
) -> None:
    """The Ray engine's output equals the single-process engine's, row for row, priced by
    the job's own price file in both (Ray's workers load the table themselves)."""
    source = tmp_path / f"in.{suffix}"
    if suffix == "jsonl":
        write_jsonl(source, _rows(40))
    else:  # row groups of 7, which the shards begin at
        pq.write_table(pa.Table.from_pylist(_rows(40)), source, row_group_size=7)
    prices = tmp_path / "prices.toml"
    prices.write_text(  # deepseek-chat at $1 a million tokens in and out
        '[[price]]\nmodel = "deepseek-chat"\nfrom = "2025-09-29"\ncache_hit = 1\n'
        "cache_miss = 1\noutput = 1\n"
    )
    own = {"input": str(source), "model": "deepseek-chat", "prices": str(prices)}
    local = fast_job_data(tmp_path, fake.base_url, **own)
    run_job(build_job({**local, "output": str(tmp_path / "local.pq")}))
    summary = run_job(_ray_job(tmp_path, fake, **own, output=str(tmp_path / "r.pq")))
    expected, got = pq.read_table(tmp_path / "local.pq"), pq.read_table(tmp_path / "r.pq")
    columns = [name for name in expected.column_names if name not in _TIMING]
    assert summary.complete and got.num_rows == 40
    assert got.select(columns).to_pylist() == expected.select(columns).to_pylist()
    for row in got.to_pylist():
        assert row["cost_usd"] == pytest.approx(row["total_tokens"] / 1e6)


def test_output_file_rows_on_ray_writes_the_same_rows_as_a_directory(
    ray_address: str, fake: FakeServer, tmp_path: Path
) -> None:
    """With `output_file_rows`, the driver compacts the shards into a directory of files that
    read back as one table, in input order."""
    import polars as pl

    write_jsonl(tmp_path / "in.jsonl", _rows(25))
    summary = run_job(_ray_job(tmp_path, fake, output_file_rows=10))
    output = tmp_path / "out.parquet"
    assert summary.complete and summary.rows_ok == 25
    assert [pq.read_metadata(f).num_rows for f in sorted(output.iterdir())] == [10, 10, 5]
    ids = pl.scan_parquet(output / "*.parquet").select("id").collect()["id"].to_list()
    assert ids == [f"r{i}" for i in range(25)]


def test_summary_adds_up_every_worker(ray_address: str, fake: FakeServer, tmp_path: Path) -> None:
    """The summary counts the rows and requests of all workers, each sweep variant once."""
    write_jsonl(tmp_path / "in.jsonl", _rows(30))
    summary = run_job(_ray_job(tmp_path, fake, sweep={"repeat": 2}))
    stats = summary.statistics
    assert stats is not None
    assert (summary.rows_ok, stats.rows_done, stats.requests) == (60, 60, 60)
    assert stats.prompt_tokens is not None and stats.prompt_tokens > 0


def test_progress_adds_up_the_workers(ray_address: str, fake: FakeServer, tmp_path: Path) -> None:
    """Progress lines during a Ray run count the rows of every running worker."""
    fake.update(latency=0.1)
    write_jsonl(tmp_path / "in.jsonl", _rows(48))
    with capture_logs() as logs:
        run_job(_ray_job(tmp_path, fake), settings=PoolSettings(progress_every=0.3))
    lines = [e for e in logs if e["event"] == "progress"]
    assert lines and lines[-1]["total"] == 48
    assert max(line["done"] for line in lines) > 0


def test_live_display_adds_up_the_workers(
    ray_address: str, fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The live display of a Ray run ends showing every worker's rows done."""
    fake.update(latency=0.05)
    write_jsonl(tmp_path / "in.jsonl", _rows(24))
    run_job(_ray_job(tmp_path, fake), settings=PoolSettings(display="live"))
    assert "24/24 (100%)" in capsys.readouterr().err


def test_limited_run_then_full_run(ray_address: str, fake: FakeServer, tmp_path: Path) -> None:
    """A --limit run keeps its shards; the full run adds shards for the rest, each id once."""
    write_jsonl(tmp_path / "in.jsonl", _rows(30))
    run_job(_ray_job(tmp_path, fake, limit=10))
    assert read_status(tmp_path / "out.parquet").rows_done == 10
    summary = run_job(_ray_job(tmp_path, fake))
    assert summary.complete and sorted(_ids(tmp_path / "out.parquet")) == sorted(
        r["id"] for r in _rows(30)
    )
    assert fake.stats()["requests"] == 30


def test_a_workers_stop_stops_the_run(
    ray_address: str, fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop met in a worker (a refused key) ends the run with that stop, resumable."""
    fake.update(api_key="sk-right")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-wrong")
    write_jsonl(tmp_path / "in.jsonl", _rows(8))
    with pytest.raises(AuthError) as stopped:
        run_job(_ray_job(tmp_path, fake))
    assert stopped.value.summary is not None and not stopped.value.summary.complete
    assert parts_dir(tmp_path / "out.parquet").is_dir()


def test_a_local_run_resumes_on_ray(ray_address: str, fake: FakeServer, tmp_path: Path) -> None:
    """A job begun by the local engine (--limit) is finished by the Ray engine, each row once."""
    write_jsonl(tmp_path / "in.jsonl", _rows(30))
    run_job(build_job(fast_job_data(tmp_path, fake.base_url, limit=10)))
    summary = run_job(_ray_job(tmp_path, fake))
    assert summary.complete and summary.statistics is not None
    assert summary.statistics.rows_skipped == 10
    assert sorted(_ids(tmp_path / "out.parquet")) == sorted(r["id"] for r in _rows(30))
    assert fake.stats()["requests"] == 30


def _shard_rows(output: Path) -> int:
    """Rows answered so far in the shard folders (journals and parts)."""
    directory = parts_dir(output)
    journalled = sum(
        journal.read_bytes().count(b"\n")
        for shard in shard_dirs(directory)
        for journal in shard.glob("journal-*.jsonl")
    )
    return journalled + sum(pq.read_metadata(p).num_rows for p in list_parts(directory))


def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_killed_worker_costs_only_its_requests_in_flight(
    ray_address: str, fake: FakeServer, tmp_path: Path
) -> None:
    """A worker killed mid-run loses only its in-flight requests; every id is in the output once."""
    fake.update(latency=0.15)
    write_jsonl(tmp_path / "in.jsonl", _rows(80))
    job = _ray_job(tmp_path, fake)
    result: dict[str, RunSummary] = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_job(job)))
    with capture_logs() as logs:
        runner.start()
        _wait_for(lambda: _shard_rows(job.output) >= 12)
        named = ray.util.list_named_actors(all_namespaces=True)
        worker = next(a for a in named if a["name"].startswith("batchrun-worker-"))
        ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]))
        runner.join(timeout=60)
    assert result["summary"].complete
    assert [e["event"] for e in logs].count("shard_resubmitted") == 1
    assert sorted(_ids(job.output)) == sorted(r["id"] for r in _rows(80))
    assert fake.stats()["requests"] <= 80 + job.limits.concurrency


def test_driver_killed_then_run_again(ray_address: str, fake: FakeServer, tmp_path: Path) -> None:
    """The driver killed with -9 and run again (joining the cluster) completes, each id once."""
    fake.update(latency=0.15)
    write_jsonl(tmp_path / "in.jsonl", _rows(80))
    output = tmp_path / "out.parquet"
    args = _cli(
        "--input", str(tmp_path / "in.jsonl"), "--output", str(output),
        "--base-url", fake.base_url, "--concurrency", "4", "--no-progress",
        "--engine", "ray", "--workers", "2", "--ray-address", ray_address,
    )  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _shard_rows(output) >= 12)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # the shard folders' parts and journals are the partial results: each row once (read
    # once Ray has ended the dead driver's workers: no row is added meanwhile)
    counts = [-1, _shard_rows(output)]
    while counts[-1] != counts[-2]:
        time.sleep(0.5)
        counts.append(_shard_rows(output))
    stopped = read_status(output)
    exported = CliRunner().invoke(cli, ["export", "--format", "jsonl", str(output)])
    assert exported.exit_code == 0, exported.output
    assert exported.stderr.startswith(f"partial: {stopped.rows_done} of 80 rows;")
    partial_ids = [orjson.loads(line)["id"] for line in exported.stdout.splitlines()]
    assert len(partial_ids) == len(set(partial_ids)) == stopped.rows_done >= 12
    done = subprocess.run(args, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert sorted(_ids(output)) == sorted(r["id"] for r in _rows(80))
    assert fake.stats()["requests"] <= 80 + 2 * 4  # at most both workers' requests in flight
    # the killed run's journalled rows count as done, not as this run's
    this_run = int(re.search(r"this run: (\d+) rows", done.stderr).group(1))  # type: ignore[union-attr]
    resumed = int(re.search(r"resumed: (\d+) rows", done.stderr).group(1))  # type: ignore[union-attr]
    assert this_run + resumed == 80


def test_sigterm_stops_the_driver_resumably(
    ray_address: str, fake: FakeServer, tmp_path: Path
) -> None:
    """SIGTERM to a Ray run's driver is a stop (exit 3, resumable), not Ray's crash dump."""
    fake.update(latency=0.15)
    write_jsonl(tmp_path / "in.jsonl", _rows(80))
    output = tmp_path / "out.parquet"
    args = _cli(
        "--input", str(tmp_path / "in.jsonl"), "--output", str(output),
        "--base-url", fake.base_url, "--concurrency", "4", "--no-progress",
        "--engine", "ray", "--workers", "2", "--ray-address", ray_address,
    )  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _shard_rows(output) >= 8)
    finally:
        driver.terminate()
        _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 3, stderr
    assert "stopped by SIGTERM" in stderr and "SIGTERM received" not in stderr
    assert "of 80 rows" in stderr  # the summary, as a local run prints it


def test_without_ray_installed_exit_2_says_how_to_install(tmp_path: Path) -> None:
    """--engine ray without Ray is exit 2, naming the extra to install."""
    write_jsonl(tmp_path / "in.jsonl", _rows(2))
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what `import ray` does when it is absent
        "from batchrun.cli import main; main()"
    )
    args = ["--input", str(tmp_path / "in.jsonl"), "--engine", "ray"]
    done = subprocess.run(
        [sys.executable, "-c", code, "run", *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "pip install 'batchrun[ray]'" in done.stderr


def test_local_instance_keeps_ray_quiet(ray_address: str, fake: FakeServer, tmp_path: Path) -> None:
    """Without an address a local Ray instance runs the job, and none of its noise is shown."""
    write_jsonl(tmp_path / "in.jsonl", _rows(6))
    args = _cli(
        "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url, "--no-progress",
        "--engine", "ray", "--workers", "1",
    )  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "complete: 6 ok" in done.stderr
    assert "Ray" not in done.stderr and "ShardWorker" not in done.stderr


def test_local_instance_listens_on_loopback_only(ray_address: str) -> None:
    """Every socket the local Ray instance listens on is bound to 127.0.0.1."""
    if not shutil.which("ss"):
        pytest.skip("needs ss (iproute2) to list listening sockets")
    assert ray_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ray_sockets = [
        line.split()[3]
        for line in listing.splitlines()
        if re.search(r'"(gcs_server|raylet|ray::[^"]*)"', line)
    ]
    assert ray_sockets, listing
    outside = [a for a in ray_sockets if not re.match(r"(\[::ffff:)?127\.0\.0\.1\]?:", a)]
    assert not outside, outside

"""Every ending says what happened: Ctrl-C at each phase, errors from inside the task group,
unwritable and full disks, damaged checkpoints, the run lock's order, status, the fake's port.

Signal tests run the real command in a subprocess; disk tests mount a small tmpfs (they are
skipped where this process may not mount, i.e. when not root).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.checkpoint import Checkpoint
from batchrun.cli import cli
from batchrun.errors import CannotWrite
from batchrun.fake import FakeServer
from batchrun.job import load_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from batchrun.sinks import INDEX_COLUMN, part_path, part_schema, parts_dir, write_atomically
from tests.conftest import fast_job_data, write_jsonl
from tests.test_cli_errors import to_toml

STOPPED = "stopped by {}: run the same command again to resume"
SIGNALS = [pytest.param(signal.SIGINT, id="ctrl-c"), pytest.param(signal.SIGTERM, id="sigterm")]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def write_job(tmp_path: Path, base_url: str, **extra: object) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(to_toml(fast_job_data(tmp_path, base_url, **extra)), encoding="utf-8")
    return path


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """`python -m batchrun ARGS` in a subprocess, stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: object, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.002)


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (Linux /proc)."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return True
    return False


def assert_stopped_cleanly(process: subprocess.Popen[str], signum: signal.Signals) -> str:
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 3, stderr
    assert STOPPED.format(signum.name) in stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    return stderr


# -- Ctrl-C at every phase -------------------------------------------------------------------


@pytest.mark.parametrize("signum", SIGNALS)
def test_ctrl_c_during_the_scan_exits_3_saying_how_to_resume(
    tmp_path: Path, fake: FakeServer, signum: signal.Signals
) -> None:
    """Ctrl-C (or SIGTERM) while the input is being checked: exit 3 and the resume line, not
    "Aborted!" and exit 1 (nor a silent kill)."""
    source = tmp_path / "in.jsonl"
    line = b'{"prompt": "a question long enough to take the scan a moment to read"}\n'
    source.write_bytes(line * 400_000)
    process = start("run", str(write_job(tmp_path, fake.base_url)), cwd=tmp_path)
    with process:
        wait_until(lambda: has_open(process.pid, source), process, "the scan")
        process.send_signal(signum)
        assert_stopped_cleanly(process, signum)
    assert fake.stats()["requests"] == 0


def _done_checkpoint(job_file: Path, rows: int, parts: int, *, undone: int = 1) -> None:
    """A checkpoint in which every row but the last `undone` has an ok result."""
    job = load_job(job_file)
    checkpoint = Checkpoint(job.output)
    checkpoint.acquire_lock()
    try:
        checkpoint.open(job, restart=False)
        checkpoint.record_rows(rows, limit=None)
    finally:
        checkpoint.release_lock()
    schema = part_schema({})
    size = rows // parts
    for number in range(parts):
        end = min((number + 1) * size, rows - undone)
        index = pa.array(range(number * size, end), pa.int64())
        count = len(index)
        columns = {
            "id": pc.cast(index, schema.field("id").type),
            "status": pa.array(["ok"] * count, pa.string()),
            "content": pa.array(["an answer of a few words"] * count, pa.large_string()),
            "cost_usd": pa.array([0.0] * count, pa.float64()),
            INDEX_COLUMN: index,
        }
        arrays = [columns.get(f.name, pa.nulls(count, f.type)) for f in schema]
        table = pa.Table.from_arrays(arrays, schema=schema)
        write_atomically(table, part_path(checkpoint.directory, number + 1))


@pytest.mark.parametrize("signum", SIGNALS)
def test_ctrl_c_during_compaction_exits_3_and_the_next_run_compacts(
    tmp_path: Path, fake: FakeServer, signum: signal.Signals
) -> None:
    """Ctrl-C (or SIGTERM) while the output is being written, after the pool sent the one row
    left: exit 3, no half file, status says the output is not yet written, and running again
    writes it without sending anything."""
    rows = 100_000
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(rows)])
    job_file = write_job(tmp_path, fake.base_url)
    _done_checkpoint(job_file, rows, parts=10)
    output = tmp_path / "out.parquet"
    process = start("run", str(job_file), cwd=tmp_path)
    with process:
        wait_until(lambda: any(tmp_path.glob(".out.parquet.tmp-*")), process, "compaction start")
        process.send_signal(signum)
        assert_stopped_cleanly(process, signum)
    assert fake.stats()["requests"] == 1
    assert not output.exists() and not any(tmp_path.glob(".out.parquet.tmp-*"))
    status = invoke("status", str(output))
    assert "checkpoint complete, output not yet written: run again to compact" in status.output
    again = invoke("run", str(job_file), "-q")
    assert again.exit_code == 0, again.output
    assert pq.read_metadata(output).num_rows == rows
    assert fake.stats()["requests"] == 1


# -- errors from inside the task group --------------------------------------------------------


def test_input_error_found_mid_run_is_exit_2_with_its_message(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A line that turns bad after the scan (the file edited under a run) is exit 2 naming the
    line, not an ExceptionGroup traceback."""
    rows = 3000
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i:05d}"} for i in range(rows)])
    lines = source.read_bytes().splitlines(keepends=True)
    bad_line = 2900  # past the first batch the run reads (2048 rows) and the read buffer
    offset = sum(len(x) for x in lines[: bad_line - 1])
    job_file = write_job(tmp_path, fake.base_url, limits={"concurrency": 16})

    def spoil_after_first_request() -> None:
        deadline = time.monotonic() + 30
        while fake.stats()["requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        with source.open("r+b") as file:  # same size: only the content changes
            file.seek(offset)
            file.write(b"{" * (len(lines[bad_line - 1]) - 1))

    spoiler = threading.Thread(target=spoil_after_first_request)
    spoiler.start()
    result = invoke("run", str(job_file), "-q")
    spoiler.join()
    assert result.exit_code == 2, result.output
    assert f"line {bad_line}: not valid JSON" in result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit)


# -- folders that cannot be written, and a full disk ------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at `path` for the block (skips the test where mount is denied)."""
    path.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """`path` made immutable with chattr +i (even root cannot add a file to it)."""
    path.mkdir(exist_ok=True)
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not possible here: {made.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@contextlib.contextmanager
def parent_is_a_file(path: Path) -> Iterator[Path]:
    path.write_text("not a folder")
    yield path


@pytest.mark.parametrize(
    "make_unwritable",
    [
        pytest.param(lambda p: tmpfs(p, "ro", "size=64k"), id="read-only-mount"),
        pytest.param(immutable, id="immutable-folder"),
        pytest.param(parent_is_a_file, id="parent-is-a-file"),
    ],
)
def test_unwritable_output_folder_is_refused_before_any_request(
    tmp_path: Path, fake: FakeServer, make_unwritable: object
) -> None:
    """An output folder nobody can write to: exit 2 naming it, before anything is sent."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    folder = tmp_path / "results"
    with make_unwritable(folder):  # type: ignore[operator]
        result = invoke(
            "run", str(write_job(tmp_path, fake.base_url, output=str(folder / "out.parquet")))
        )
    assert result.exit_code == 2, result.output
    assert f"error: {folder}" in result.output and "cannot be written" in result.output
    assert fake.stats()["requests"] == 0


@pytest.mark.parametrize("restart", [[], ["--restart"]], ids=["run", "restart"])
def test_an_output_that_is_a_folder_is_refused_and_left_alone(
    tmp_path: Path, fake: FakeServer, restart: list[str]
) -> None:
    """`--output results` naming a folder: exit 2 saying it is a folder, with or without
    --restart (which once called it another job's output, then crashed trying to delete it);
    the folder, its files and the output's parent are left as they were."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    job_file = write_job(tmp_path, fake.base_url, output=str(folder))
    result = invoke("run", str(job_file), *restart)
    assert result.exit_code == 2, result.output
    assert f"error: {folder}: is a folder: the output is a Parquet file" in result.output
    assert "Traceback" not in result.output
    assert (folder / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "results.parts").exists()
    assert fake.stats()["requests"] == 0


def fill(folder: Path, *, leave: int) -> Path:
    """Fill the file system of `folder` but `leave` bytes; returns the filler file."""
    filler = folder / "filler"
    with filler.open("wb") as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 65536)
            file.flush()
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def test_full_disk_mid_run_stops_with_exit_3_and_completes_once_space_is_freed(
    tmp_path: Path, fake: FakeServer
) -> None:
    """No space left while journalling: exit 3 naming the folder, journalled rows are kept,
    and the same command completes once space is freed, without asking kept rows again."""
    rows = 300
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(rows)])
    with tmpfs(tmp_path / "disk", "size=512k") as disk:
        job_file = write_job(
            tmp_path, fake.base_url, output=str(disk / "out.parquet"), limits={"concurrency": 2}
        )
        filler = fill(disk, leave=48 * 1024)
        first = invoke("run", str(job_file), "-q")
        assert first.exit_code == 3, first.output
        assert f"no space left on device at {parts_dir(disk / 'out.parquet')}" in first.output
        kept = invoke("status", str(disk / "out.parquet"))
        done = int(kept.output.split("rows:")[1].split()[0])
        assert 0 < done < rows, kept.output
        filler.unlink()
        second = invoke("run", str(job_file), "-q")
        assert second.exit_code == 0, second.output
        out = pq.read_table(disk / "out.parquet").to_pylist()
    assert [r["content"] for r in out] == [f"echo: q{i}" for i in range(rows)]
    assert all(r["status"] == "ok" for r in out)
    assert fake.stats()["requests"] <= rows + 2  # at most the rows in flight at the failure


def test_full_disk_while_compacting_stops_with_exit_3_and_compacts_once_space_is_freed(
    tmp_path: Path, fake: FakeServer
) -> None:
    """No space left for the output file: exit 3 naming it, no temporary left, the checkpoint
    kept whole, and the same command writes the output once space is freed."""
    rows = 20_000
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(rows)])
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        output = disk / "out.parquet"
        job_file = write_job(tmp_path, fake.base_url, output=str(output))
        _done_checkpoint(job_file, rows, parts=2, undone=0)
        filler = fill(disk, leave=8 * 1024)
        first = invoke("run", str(job_file), "-q")
        assert first.exit_code == 3, first.output
        assert f"no space left on device at {output}" in first.output
        assert not output.exists() and not list(disk.glob(".out.parquet.tmp-*"))
        filler.unlink()
        second = invoke("run", str(job_file), "-q")
        assert second.exit_code == 0, second.output
        assert pq.read_metadata(output).num_rows == rows
    assert fake.stats()["requests"] == 0


# -- damaged checkpoints --------------------------------------------------------------------


def _stopped_checkpoint(tmp_path: Path, fake: FakeServer) -> Path:
    """A checkpoint of a run stopped by --limit, with its part files."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    job_file = write_job(tmp_path, fake.base_url)
    assert invoke("run", str(job_file), "--limit", "2", "-q").exit_code == 0
    (tmp_path / "out.parquet").unlink()
    return job_file


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        pytest.param(
            lambda d: (d / "manifest.json").write_text("{not json"), "not JSON", id="json"
        ),
        pytest.param(
            lambda d: (d / "manifest.json").write_text('["a list"]'), "not a JSON", id="shape"
        ),
        pytest.param(
            lambda d: (d / "manifest.json").write_text('{"fingerprint": {}, "rows": "many"}'),
            "'rows'",
            id="field",
        ),
        pytest.param(
            lambda d: (d / "part-000001.parquet").write_bytes(b"PAR1 torn"),
            "not a readable Parquet file",
            id="part",
        ),
        pytest.param(lambda d: (d / "manifest.json").unlink(), "missing", id="no-manifest"),
    ],
)
@pytest.mark.parametrize("command", ["run", "status"])
def test_damaged_checkpoint_is_exit_2_naming_the_file_and_restart(
    tmp_path: Path, fake: FakeServer, damage: object, what: str, command: str
) -> None:
    """A damaged manifest or part file: exit 2, one line naming the file and --restart."""
    job_file = _stopped_checkpoint(tmp_path, fake)
    directory = parts_dir(tmp_path / "out.parquet")
    damage(directory)  # type: ignore[operator]
    sent = fake.stats()["requests"]
    args = ("run", str(job_file)) if command == "run" else ("status", str(tmp_path / "out.parquet"))
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {directory}/"), result.output
    assert what in lines[0] and "--restart" in lines[0]
    assert fake.stats()["requests"] == sent
    if command == "run":
        assert invoke("run", str(job_file), "--restart", "-q").exit_code == 0


# -- the run lock, status ------------------------------------------------------------------


def test_run_lock_is_taken_before_the_checkpoint_is_read(tmp_path: Path, fake: FakeServer) -> None:
    """While another run holds the lock, a second run is refused as such and reads nothing
    of the checkpoint (here a manifest it could not read)."""
    job_file = _stopped_checkpoint(tmp_path, fake)
    (parts_dir(tmp_path / "out.parquet") / "manifest.json").write_text("{half written")
    holder = Checkpoint(tmp_path / "out.parquet")
    holder.acquire_lock()
    try:
        result = invoke("run", str(job_file))
    finally:
        holder.release_lock()
    assert result.exit_code == 2, result.output
    assert f"another run (pid {os.getpid()}) is using this output" in result.output


def test_status_says_complete_only_when_the_output_file_exists(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A checkpoint with every row done but no output file is not "complete"."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    job_file = write_job(tmp_path, fake.base_url)
    # --limit keeps the checkpoint; 3 of 3 rows makes it complete
    assert invoke("run", str(job_file), "--limit", "3", "-q").exit_code == 0
    output = tmp_path / "out.parquet"
    assert "state:   complete up to --limit 3" in invoke("status", str(output)).output
    output.unlink()  # as a kill during compaction leaves it
    state = invoke("status", str(output)).output
    assert "checkpoint complete, output not yet written: run again to compact" in state


# -- the fake's port ----------------------------------------------------------------------


def test_fake_server_on_a_port_in_use_is_one_line_and_exit_2() -> None:
    """`batchrun fake-server --port N` with N taken: one error line, exit 2, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("fake-server", "--port", str(port))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_output_of_another_job_is_refused_leaving_no_checkpoint_folder(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The lock is taken in the checkpoint folder first; refusing a foreign output file
    removes that folder again."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    pq.write_table(pa.table({"a": [1]}), tmp_path / "out.parquet")
    result = invoke("run", str(write_job(tmp_path, fake.base_url)))
    assert result.exit_code == 2, result.output
    assert "was not written by this job" in result.output
    assert not parts_dir(tmp_path / "out.parquet").exists()


def test_checkpoint_folder_turned_unwritable_mid_run_stops_resumably(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The checkpoint folder made immutable while a run writes parts: the run stops
    (CannotWrite, exit 3) naming the folder and why, and completes once it is writable again."""
    rows = 60
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(rows)])
    job = load_job(write_job(tmp_path, fake.base_url, limits={"concurrency": 2}))
    directory = parts_dir(job.output)
    fake.update(latency=0.005)

    def freeze_after_some_requests() -> None:
        deadline = time.monotonic() + 30
        while fake.stats()["requests"] < 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        subprocess.run(["chattr", "+i", str(directory)], check=True)

    if subprocess.run(["chattr", "-i", str(tmp_path)], check=False).returncode != 0:
        pytest.skip("chattr is not possible here")
    freezer = threading.Thread(target=freeze_after_some_requests)
    freezer.start()
    try:
        with pytest.raises(CannotWrite) as stopped:
            run_job(job, settings=PoolSettings(flush_rows=4, stop_grace=1))
    finally:
        freezer.join()
        subprocess.run(["chattr", "-i", str(directory)], check=False)
    assert str(stopped.value).startswith(f"cannot write at {directory} (Operation not permitted)")
    assert stopped.value.exit_code == 3
    fake.update(latency=0.0)
    summary = run_job(job)
    assert summary.complete and summary.rows_ok == rows
    assert fake.stats()["requests"] <= rows + 4  # what was in flight, at most, is asked again


# -- status, report and export after a run -----------------------------------------------------


def test_status_report_and_export_take_the_job_file(tmp_path: Path, fake: FakeServer) -> None:
    """The command a user just ran names a job file: status, report and export accept it and
    read the output it names, rather than calling the TOML "not a Parquet file"."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(3)])
    job_file = write_job(tmp_path, fake.base_url)
    assert invoke("run", str(job_file), "-q").exit_code == 0
    state = invoke("status", str(job_file))
    assert state.exit_code == 0, state.output
    assert f"output:  {tmp_path / 'out.parquet'}" in state.output
    assert "state:   complete" in state.output
    report = invoke("report", str(job_file))
    assert report.exit_code == 0, report.output
    exported = invoke("export", "--format", "openai-batch", str(job_file))
    assert exported.exit_code == 0, exported.output
    lines = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2"]


def test_a_stopped_run_is_described_and_reported_as_partial(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Stopped by --max-cost against a server that sends no usage: status says the tokens
    were not reported (not 0), and report and export read the checkpoint and say, as status
    does, that the results are partial, rather than "no such file"."""
    fake.update(usage="omit")
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(20)])
    job_file = write_job(tmp_path, fake.base_url, params={"max_tokens": 1000})
    stopped = invoke("run", str(job_file), "-q", "--max-cost", "0.005")
    assert stopped.exit_code == 3, stopped.output
    assert fake.stats()["requests"] > 0
    output = tmp_path / "out.parquet"
    assert not output.exists()
    state = invoke("status", str(output)).output
    assert "tokens:  not reported (the server sent no usage)" in state
    (partial,) = [line for line in state.splitlines() if line.startswith("partial: ")]
    assert partial.endswith(
        "of 20 rows; the job is not finished: run the same command again to resume"
    )
    for args in (["report"], ["export", "--format", "jsonl"]):
        result = invoke(*args, str(output))
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines() == [partial]

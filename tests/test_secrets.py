"""The API key never appears in anything a run produces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from batchrun.fake import FakeServer
from tests.conftest import write_jsonl

SENTINEL = "sk-SENTINEL-7f3a9c1e5b2d4086"


def _run(tmp_path: Path, fake: FakeServer, *extra: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "batchrun", "run", "--input", str(tmp_path / "in.jsonl")]
    command += ["--output", str(tmp_path / "out.parquet"), "--base-url", fake.base_url]
    command += ["--api-key-env", "SENTINEL_KEY", "--max-attempts", "3", "-v", *extra]
    env = {**os.environ, "SENTINEL_KEY": SENTINEL}
    return subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)


def _everything_written(tmp_path: Path, result: subprocess.CompletedProcess[bytes]) -> bytes:
    blobs = [result.stdout, result.stderr]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "in.jsonl"]
    return b"\n".join(blobs)


def test_sentinel_key_is_nowhere_after_a_run_with_retries(tmp_path: Path, fake: FakeServer) -> None:
    """A run with retries and error rows leaves the key in no stream, log, checkpoint or output."""
    fake.update(api_key=SENTINEL)
    rows = [{"prompt": "a [[fault:500]]"}, {"prompt": "b [[fault:400*always]]"}, {"prompt": "c"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = _run(tmp_path, fake, "--log-file", str(tmp_path / "run.log"), "--limit", "3")
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "run.log").stat().st_size > 0
    assert SENTINEL.encode() not in _everything_written(tmp_path, result)


def test_key_echoed_by_the_server_is_redacted(tmp_path: Path, fake: FakeServer) -> None:
    """A server that echoes a rejected key in its error does not get it into our output."""
    fake.update(api_key="some-other-key-123456")
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = _run(tmp_path, fake)
    assert result.returncode == 3
    assert b"rejected the API key" in result.stderr and b"[redacted]" in result.stderr
    assert SENTINEL.encode() not in _everything_written(tmp_path, result)

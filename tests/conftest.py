"""Shared fixtures: one fake DeepSeek server on 127.0.0.1 for the session, reset per test."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import structlog

from batchrun.fake import FakeConfig, FakeServer


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """A CLI `run` configures structlog for its stderr (with -q, warnings only); undo that, so
    that a later test's capture_logs still sees info events such as progress."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def ray_address(request: pytest.FixtureRequest) -> Iterator[str]:
    """One local Ray instance for all the Ray test modules, bound to 127.0.0.1 and quiet: a
    start costs seconds, so it is shut down only after the last module that uses it."""
    ray = pytest.importorskip("ray")  # the `ray` extra; CI installs it
    from batchrun.ray_engine import start_local

    if not ray.is_initialized():
        start_local(ray, num_cpus=4, log_to_driver=False, logging_level="ERROR")
    yield str(ray.get_runtime_context().gcs_address)
    users = [item for item in request.session.items if "ray_address" in item.fixturenames]
    if not users or users[-1].module is request.module:
        ray.shutdown()


@pytest.fixture(scope="session")
def fake_session() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig()) as server:
        yield server


@pytest.fixture
def fake(fake_session: FakeServer) -> FakeServer:
    """The session's fake server, with counters, log and config reset."""
    fake_session.reset(FakeConfig())
    return fake_session


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def fast_job_data(tmp_path: Path, base_url: str, **extra: Any) -> dict[str, Any]:
    """Job data for tests: short backoffs so retries take milliseconds; the 2025 model (as a
    reseller serves it), which does not think, so answers and costs are the plain ones."""
    data: dict[str, Any] = {
        "input": str(tmp_path / "in.jsonl"),
        "output": str(tmp_path / "out.parquet"),
        "base_url": base_url,
        "model": "deepseek-chat",
        "limits": {
            "concurrency": 4,
            "max_attempts": 4,
            "initial_backoff": 0.01,
            "max_backoff": 0.05,
            "timeout": 10,
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


class ManualClock:
    """A wall clock the test sets from its own thread; sleepers wake when it passes their time."""

    def __init__(self, at: datetime) -> None:
        self._at = at
        self._lock = threading.Lock()
        self.sleepers = 0

    def now(self) -> datetime:
        with self._lock:
            return self._at

    def set(self, at: datetime) -> None:
        with self._lock:
            self._at = at

    async def sleep_until(self, when: datetime, *, wake: anyio.Event | None = None) -> None:
        with self._lock:
            self.sleepers += 1
        try:
            # polled: the test moves the clock from another thread, which cannot set an Event
            while self.now() < when and not (wake is not None and wake.is_set()):  # noqa: ASYNC110
                await anyio.sleep(0.002)
        finally:
            with self._lock:
                self.sleepers -= 1


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` run in a fresh interpreter (what it imports is its own), its exit checked."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done

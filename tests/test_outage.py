"""Endpoint outages are not row errors; the key variable; stopping while every worker waits.

End to end through the real HTTP path: a port where nothing listens, a fake that goes down and
comes back on the same port, a wrong path. DNS failures are tested narrowly through
httpx.MockTransport raising the error httpx raises, so that no test sends a DNS query.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from batchrun.cli import cli
from batchrun.client import Client
from batchrun.errors import (
    AuthError,
    ConnectFailed,
    EndpointUnreachable,
    KeyWanted,
    RetryableError,
)
from batchrun.fake import FakeConfig, FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from batchrun.sinks import list_journals, list_parts, parts_dir
from tests.conftest import fast_job_data, write_jsonl
from tests.test_cli_errors import write_job
from tests.test_resume import start_run, wait_for_requests
from tests.test_runner import prompts, read_output

SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def job_for(tmp_path: Path, base_url: str, rows: int = 10, **extra: Any) -> Any:
    write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    return build_job(fast_job_data(tmp_path, base_url, **extra))


def rows_written(tmp_path: Path) -> int:
    """Rows in the checkpoint's part files and journals."""
    folder = parts_dir(tmp_path / "out.parquet")
    if not folder.exists():
        return 0
    import pyarrow.parquet as pq

    parts = sum(pq.read_metadata(p).num_rows for p in list_parts(folder))
    journaled = sum(len(p.read_bytes().splitlines()) for p in list_journals(folder))
    return parts + journaled


# --- nothing there at the start --------------------------------------------------------------


def test_nothing_listening_stops_with_the_url_and_no_error_rows(tmp_path: Path) -> None:
    """A port where nothing listens: exit 3 naming the URL, no row written, no attempt spent."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    job = write_job(tmp_path, url, limits={"start_timeout": 0.3})
    write_jsonl(tmp_path / "in.jsonl", prompts(10))
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["run", str(job), "-q"])
    assert result.exit_code == 3, result.output
    assert f"cannot connect to {url}/chat/completions" in result.output
    assert time.monotonic() - started < 5
    assert rows_written(tmp_path) == 0 and not (tmp_path / "out.parquet").exists()


def test_a_wrong_path_stops_at_once_naming_the_url(tmp_path: Path, fake: FakeServer) -> None:
    """Every answer a 404 page (no API at that path): the run stops before any row is written."""
    job = job_for(tmp_path, fake.base_url + "/wrong", limits={"start_timeout": 20})
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable) as caught:
        run_job(job, settings=SETTINGS)
    assert f"cannot connect to {fake.base_url}/wrong/chat/completions" in str(caught.value)
    assert "404" in str(caught.value)
    assert time.monotonic() - started < 5
    assert rows_written(tmp_path) == 0


def test_an_api_404_stays_a_row_error(tmp_path: Path, fake: FakeServer) -> None:
    """A 404 with an API error body (an unknown model, say) is the row's error, as before."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a [[fault:404]]"}, {"prompt": "b"}])
    job = build_job(fast_job_data(tmp_path, fake.base_url))
    summary = run_job(job, settings=SETTINGS)
    assert (summary.rows_ok, summary.rows_error) == (1, 1)


@pytest.mark.anyio
async def test_dns_failure_is_a_connect_failure() -> None:
    """The ConnectError httpx raises for a name that does not resolve is a connect failure
    (the endpoint's), not a row's network error."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)

    client = Client(
        "http://no-such-host.invalid",
        api_key=None,
        max_connections=1,
        transport=httpx.MockTransport(handler),
    )
    async with client:
        with pytest.raises(ConnectFailed) as caught:
            await client.send({"model": "m", "messages": []})
    assert caught.value.error_class == "connect"


# --- going away mid-run ----------------------------------------------------------------------


class Outage:
    """Stops the fake once it has answered `after` requests; starts it again on the same port
    `down_for` seconds later (never, if None). `seconds` is how long it was down."""

    def __init__(self, server: FakeServer, *, after: int, down_for: float | None) -> None:
        self.server = server
        self.after = after
        self.down_for = down_for
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 20
        while self.server.stats()["requests"] < self.after and time.monotonic() < deadline:
            time.sleep(0.002)
        went = time.monotonic()
        self.server.stop()
        if self.down_for is not None:
            time.sleep(self.down_for)
            self.server.start()
            self.seconds = time.monotonic() - went

    def join(self) -> None:
        self._thread.join()


def test_endpoint_down_mid_run_pauses_then_every_row_ends_ok_without_spent_attempts(
    tmp_path: Path,
) -> None:
    """The fake goes away mid-run and comes back on its port: every row ends ok, no row has
    more than one attempt, and the logs and progress lines say the endpoint was unreachable."""
    with FakeServer(FakeConfig(latency=0.005)) as server:
        job = job_for(tmp_path, server.base_url, rows=60, limits={"outage_timeout": 20})
        thread = Outage(server, after=15, down_for=0.6)
        settings = PoolSettings(
            flush_rows=2, flush_seconds=0.05, display="lines", progress_every=0.05
        )
        with capture_logs() as logs:
            summary = run_job(job, settings=settings)
        thread.join()
        out = read_output(tmp_path)
    assert summary.complete and summary.rows_ok == 60
    assert {r["attempts"] for r in out} == {1}
    events = [e["event"] for e in logs]
    assert "endpoint_unreachable" in events and "endpoint_back" in events
    notes = [e.get("endpoint") for e in logs if e["event"] == "progress"]
    assert any(n and n.startswith("endpoint unreachable since ") for n in notes)
    assert all(n.endswith(", retrying") for n in notes if n)


def test_while_down_one_probe_at_a_time(tmp_path: Path) -> None:
    """While the endpoint is down, the waiting workers send one probe at a time, so probes
    over the outage number about its length over the probe delay, not that times the workers."""
    # answers take a moment, so the run is still going when the fake stops after 5 (with
    # instant answers a loaded machine could finish all 40 rows first)
    with FakeServer(FakeConfig(latency=0.1)) as server:
        job = job_for(
            tmp_path,
            server.base_url,
            rows=40,
            limits={
                "concurrency": 16,
                "initial_backoff": 0.1,
                "max_backoff": 0.1,
                "outage_timeout": 20,
            },
        )
        thread = Outage(server, after=5, down_for=0.8)
        with capture_logs() as logs:
            summary = run_job(job, settings=SETTINGS)
        thread.join()
    assert summary.rows_ok == 40
    down = [e for e in logs if e["event"] == "endpoint_unreachable"]
    probes = [e for e in logs if e["event"] == "endpoint_probe_failed"]
    assert len(down) == 1
    # one probe every 0.1 s while down, not one per waiting worker (16)
    assert 2 <= len(probes) <= thread.seconds / 0.1 + 3


def test_outage_longer_than_outage_timeout_stops_resumably(tmp_path: Path) -> None:
    """Down past outage_timeout: exit 3 naming the URL and since when; rows done are kept,
    none is an error, and the same job completes once the endpoint is back."""
    with FakeServer(FakeConfig(latency=0.005)) as server:
        job = job_for(tmp_path, server.base_url, rows=60, limits={"outage_timeout": 0.3})
        thread = Outage(server, after=10, down_for=None)
        with pytest.raises(EndpointUnreachable) as caught:
            run_job(job, settings=SETTINGS)
        thread.join()
        message = str(caught.value)
        assert f"cannot connect to {server.base_url}/chat/completions since " in message
        summary = caught.value.summary
        assert summary is not None and summary.rows_error == 0 and 0 < summary.rows_ok < 60
        server.start()
        again = run_job(job, settings=SETTINGS)
    assert again.complete and again.rows_ok == 60
    assert {r["attempts"] for r in read_output(tmp_path)} == {1}


def test_every_connection_reset_is_an_outage_too(tmp_path: Path, fake: FakeServer) -> None:
    """The endpoint accepts connections but resets every request: after a few resets across
    rows the pool waits and probes; when requests go through again every row ends ok, with
    no attempt spent on the resets."""
    fake.update(fail_rate=1.0, faults=("drop",))
    # a drop waits up to initial_backoff for a verdict: room for the other rows' resets to
    # come in on a loaded machine
    limits = {"initial_backoff": 0.3, "max_backoff": 0.3}
    job = job_for(tmp_path, fake.base_url, rows=20, limits=limits)

    def recover() -> None:
        deadline = time.monotonic() + 20
        while fake.stats()["requests"] < 6 and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.3)
        fake.update(fail_rate=0.0)

    thread = threading.Thread(target=recover, daemon=True)
    thread.start()
    with capture_logs() as logs:
        summary = run_job(job, settings=SETTINGS)
    thread.join()
    assert summary.rows_ok == 20
    assert {r["attempts"] for r in read_output(tmp_path)} == {1}
    assert "endpoint_unreachable" in [e["event"] for e in logs]


def test_one_dropped_connection_is_a_normal_retry(tmp_path: Path, fake: FakeServer) -> None:
    """A single connection dropped mid-request is retried as usual (a counted attempt), with
    no outage declared."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a [[fault:drop]]"}, {"prompt": "b"}])
    with capture_logs() as logs:
        summary = run_job(build_job(fast_job_data(tmp_path, fake.base_url)), settings=SETTINGS)
    assert summary.rows_ok == 2
    assert sorted(r["attempts"] for r in read_output(tmp_path)) == [1, 2]
    assert "endpoint_unreachable" not in [e["event"] for e in logs]


# --- the key ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_missing_key_is_refused_before_the_input_is_read(
    tmp_path: Path, fake: FakeServer, value: str | None
) -> None:
    """An unset or empty key variable for a remote URL: exit 2 naming the variable, even when
    the input is unreadable (it is not read first)."""
    (tmp_path / "in.jsonl").write_text("{not json\n", encoding="utf-8")
    remote = fake.base_url.replace("127.0.0.1", "0.0.0.0")
    job = write_job(tmp_path, remote, api_key_env="BATCHRUN_TEST_OUTAGE_KEY")
    result = CliRunner().invoke(cli, ["run", str(job)], env={"BATCHRUN_TEST_OUTAGE_KEY": value})
    assert result.exit_code == 2, result.output
    assert "BATCHRUN_TEST_OUTAGE_KEY" in result.output and "in.jsonl" not in result.output
    assert fake.stats()["requests"] == 0


def test_loopback_server_wanting_a_key_names_the_variable(
    tmp_path: Path, fake: FakeServer, monkeypatch: Any
) -> None:
    """No key set for a loopback URL: none is sent; a 401 says which variable to set."""
    fake.update(api_key="sk-needed-123456")
    monkeypatch.delenv("BATCHRUN_TEST_OUTAGE_KEY", raising=False)
    job = job_for(tmp_path, fake.base_url, api_key_env="BATCHRUN_TEST_OUTAGE_KEY")
    with pytest.raises(KeyWanted) as caught:
        run_job(job, settings=SETTINGS)
    assert "the server wants a key: set BATCHRUN_TEST_OUTAGE_KEY" in str(caught.value)
    assert caught.value.exit_code == 3


def test_keyless_refusal_never_says_a_key_was_rejected(
    tmp_path: Path, fake: FakeServer, monkeypatch: Any
) -> None:
    """Through the command: with no key sent, neither the log line of the run stopping nor the
    last line says the server "rejected the API key"; both say which variable to set."""
    fake.update(api_key="sk-needed-123456")
    monkeypatch.delenv("BATCHRUN_TEST_OUTAGE_KEY", raising=False)
    write_jsonl(tmp_path / "in.jsonl", prompts(5))
    job_file = write_job(tmp_path, fake.base_url, api_key_env="BATCHRUN_TEST_OUTAGE_KEY")
    result = CliRunner().invoke(cli, ["run", str(job_file)])
    assert result.exit_code == 3, result.output
    assert "rejected the API key" not in result.output
    wanted = "the server wants a key: set BATCHRUN_TEST_OUTAGE_KEY"
    assert result.output.count(wanted) >= 2, result.output  # the log line and the last line


@pytest.mark.parametrize(
    ("content", "refused"),
    [
        pytest.param(b"Internal Server Error", True, id="plain-text"),
        pytest.param(b'{"error": {"message": "boom", "type": "server_error"}}', False, id="json"),
    ],
)
@pytest.mark.anyio
async def test_plain_text_500s_to_keyless_first_requests_mean_a_key_is_wanted(
    content: bytes, refused: bool
) -> None:
    """Without a key, plain-text 500s on the first requests are taken as a refusal (AuthError)
    by the third; JSON 500s stay retryable server errors."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers
        return httpx.Response(500, content=content)

    client = Client(
        "http://127.0.0.1:9",
        api_key=None,
        max_connections=1,
        transport=httpx.MockTransport(handler),
    )
    errors = []
    async with client:
        for _ in range(3):
            try:
                await client.send({"model": "m", "messages": []})
            except Exception as exc:
                errors.append(type(exc))
    assert errors[:2] == [RetryableError, RetryableError]
    assert (errors[2] is AuthError) == refused


# --- stopping while every worker waits -------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "signum"),
    [
        pytest.param("429", signal.SIGTERM, id="429-pause-sigterm"),
        pytest.param("rpm", signal.SIGINT, id="rpm-budget-ctrl-c"),
    ],
)
def test_signal_while_every_worker_waits_ends_within_seconds(
    tmp_path: Path, fake: FakeServer, wait: str, signum: signal.Signals
) -> None:
    """SIGTERM or Ctrl-C while every worker waits out a long 429 pause or an RPM budget far
    below the row count: nothing is in flight, so the run ends in seconds (not after the
    grace period for requests in flight), exit 3, resumable."""
    write_jsonl(tmp_path / "in.jsonl", prompts(20))
    if wait == "429":
        fake.update(rpm=1)  # one answer, then 429s asking for about a minute's wait
        extra: tuple[str, ...] = ()
    else:
        extra = ("--rpm", "1")
    with start_run(tmp_path, fake, "--concurrency", "4", *extra) as process:
        wait_for_requests(fake, 4 if wait == "429" else 1, process)
        time.sleep(0.3)  # the workers reach their waits
        signalled = time.monotonic()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr
    assert time.monotonic() - signalled < 5
    assert "run the same command again to resume" in stderr


def test_display_says_since_when_the_endpoint_is_unreachable() -> None:
    """While the endpoint is down, the live display's pool line and the progress line's
    `endpoint` field say "endpoint unreachable since 14:02, retrying"."""
    from rich.console import Console

    from batchrun.outage import GateStatistics
    from batchrun.progress import Tally, progress_fields, render

    class DownGate:
        def statistics(self) -> GateStatistics:
            return GateStatistics(datetime(2026, 1, 1, 14, 2), probes=3, outages=1)

    stats = Tally(rows_total=10).statistics()
    assert progress_fields(stats, None, DownGate())["endpoint"] == (
        "endpoint unreachable since 14:02, retrying"
    )
    console = Console(record=True, width=120)
    console.print(render(stats, None, DownGate()))
    assert "endpoint unreachable since 14:02, retrying" in console.export_text()


def test_a_request_sent_again_after_an_outage_is_priced_when_it_leaves(tmp_path: Path) -> None:
    """An outage from peak into off-peak: a request that waited for the endpoint and went
    again after 04:00 is priced off-peak and its row starts at 04:00, when it really left."""
    from tests.conftest import ManualClock
    from tests.test_schedule import FLASH_LIKE, OFF_PEAK, TUESDAY, _by_hand

    (tmp_path / "prices.toml").write_text(FLASH_LIKE)
    clock = ManualClock(TUESDAY.replace(hour=3, minute=59))
    with FakeServer(FakeConfig(latency=0.05)) as server:
        limits = {"concurrency": 4, "outage_timeout": 20, "initial_backoff": 0.05}
        job = job_for(
            tmp_path, server.base_url, rows=24, model="fake-flash",
            prices=str(tmp_path / "prices.toml"), limits=limits,
        )  # fmt: skip

        before: list[int] = []

        def outage() -> None:
            wait_for_requests(server, 6, None)
            server.stop()  # the requests that meet the closed port wait at the gate
            before.append(len(server.requests()))
            time.sleep(0.3)
            clock.set(TUESDAY.replace(hour=4))
            server.start()

        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        summary = run_job(job, settings=PoolSettings(clock=clock, flush_rows=2))
        thread.join()
        sent = [body["messages"][-1]["content"] for body in server.requests()]
    assert summary.rows_ok == 24
    after = set(sent[before[0] :])
    texts = [p["prompt"] for p in prompts(24)]
    rows = read_output(tmp_path)
    assert any(row["started_at"].hour == 3 for row in rows)  # the run began at peak
    for i in (i for i, text in enumerate(texts) if text in after):
        assert rows[i]["started_at"].hour == 4
        assert rows[i]["cost_usd"] == pytest.approx(_by_hand(rows[i], OFF_PEAK))

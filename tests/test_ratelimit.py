"""The rate-limiter seam: leases of the local limiter (on trio's mock clock), and a run whose
limiter is a stub implementing the protocol, passed in."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest
from trio.testing import MockClock

from batchrun.fake import FakeServer
from batchrun.job import Limits, build_job
from batchrun.limits import Limiter, LimiterStatistics, Outcome, Settlement
from batchrun.pool import PoolSettings
from batchrun.ratelimit import Lease, LocalRateLimiter, RateLimiter, Scope, key_digest
from batchrun.runner import run_job
from tests.conftest import fast_job_data, write_jsonl

TRIO = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio")]
)
SCOPE = Scope("http://127.0.0.1/v1/chat/completions", key_digest("sk-test"), "deepseek-chat")
SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)


def test_a_scope_names_the_key_by_a_digest() -> None:
    """The key never travels in a scope: a digest stands for it, the same for the same key."""
    assert key_digest("sk-secret") == key_digest("sk-secret") != key_digest("sk-other")
    assert "sk-secret" not in key_digest("sk-secret") and key_digest(None) == ""


@TRIO
async def test_a_cancelled_lease_gives_its_request_back(anyio_backend: object) -> None:
    """A lease cancelled unsent returns its request to the RPM bucket: the next goes at once."""
    local = LocalRateLimiter(Limiter(concurrency=4, rpm=60, adaptive=False), lease_seconds=60.0)
    lease = await local.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
    await local.cancel(lease)
    start = anyio.current_time()
    again = await local.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
    assert anyio.current_time() == start and again.number == lease.number + 1
    assert local.statistics().in_flight == 1


@TRIO
async def test_a_cancelled_wait_takes_nothing(anyio_backend: object) -> None:
    """A reserve cancelled while it waits (here for a pause) holds no slot afterwards."""
    local = LocalRateLimiter(Limiter(concurrency=1, adaptive=False), lease_seconds=60.0)
    await local.pause(SCOPE, 100.0)
    with anyio.move_on_after(1.0):
        await local.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
    assert local.statistics().in_flight == 0 and local.statistics().paused_for > 0


class StubLimiter:
    """A limiter of the test's own: counts what the pool asks of it, and pauses on a 429
    for the Retry-After it is given."""

    def __init__(self, concurrency: int = 4) -> None:
        #: what `statistics` reports (0: the limiter does not know)
        self.concurrency = concurrency
        self.scopes: list[Scope] = []
        self.settled: list[Outcome] = []
        self.cancelled = 0
        self.in_flight = 0
        self.paused_until = 0.0
        #: (Retry-After, seconds until the next reservation after it was granted)
        self.holds: list[float] = []
        self._paused_at: float | None = None

    async def reserve(self, scope: Scope, *, prompt_tokens: int, completion_cap: int) -> Lease:
        await anyio.sleep(max(0.0, self.paused_until - anyio.current_time()))
        if self._paused_at is not None:
            self.holds.append(anyio.current_time() - self._paused_at)
            self._paused_at = None
        self.scopes.append(scope)
        self.in_flight += 1
        return Lease(scope, len(self.scopes), anyio.current_time() + 60.0)

    async def settle(self, lease: Lease, settlement: Settlement) -> None:
        self.in_flight -= 1
        self.settled.append(settlement.outcome)
        if settlement.retry_after is not None:
            await self.pause(lease.scope, settlement.retry_after)
            self._paused_at = anyio.current_time()

    async def cancel(self, lease: Lease) -> None:
        self.in_flight -= 1
        self.cancelled += 1

    async def pause(self, scope: Scope, seconds: float) -> None:
        self.paused_until = max(self.paused_until, anyio.current_time() + seconds)

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            concurrency=self.concurrency,
            in_flight=self.in_flight,
            waiting=0,
            paused_for=max(0.0, self.paused_until - anyio.current_time()),
            rpm_limit=None,
            tpm_limit=None,
            rate_limited=self.settled.count(Outcome.RATE_LIMITED),
            reserved_tokens=0,
        )


def test_a_limiter_reporting_no_concurrency_gets_every_worker_at_once(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The pool starts workers from the limiter's reported concurrency; a limiter of the
    caller's that reports 0 (it does not know one) gets the job's whole `concurrency` at once,
    not the few workers of a concurrency of 0 for good."""
    fake.update(latency=0.1)
    stub = StubLimiter(concurrency=0)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(64)])
    data = fast_job_data(tmp_path, fake.base_url, limits={"concurrency": 64})
    summary = run_job(build_job(data), settings=SETTINGS, rate_limiter=lambda limits: stub)
    stats = summary.statistics
    assert summary.rows_ok == 64 and stats is not None and stats.workers == 64


def test_the_pool_takes_its_limiter_from_the_caller(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stub limiter passed to `run_job` meters every request the server saw, with the
    run's scope (the key only as its digest); its pause after a 429 holds the next send for
    the Retry-After."""
    fake.update(api_key="sk-scope-123456")
    monkeypatch.setenv("TEST_KEY", "sk-scope-123456")
    stub = StubLimiter()
    limiter: RateLimiter = stub  # the stub implements the protocol (checked by mypy)
    rows = [{"prompt": f"question {i}"} for i in range(5)]
    rows.append({"prompt": "[[fault:429@0.2]] question 5"})
    write_jsonl(tmp_path / "in.jsonl", rows)
    limits = {"concurrency": 1, "max_attempts": 1}
    data = fast_job_data(tmp_path, fake.base_url, limits=limits, api_key_env="TEST_KEY")
    made: list[Limits] = []

    def make(limits: Limits) -> RateLimiter:
        made.append(limits)
        return limiter

    summary = run_job(build_job(data), settings=SETTINGS, rate_limiter=make)
    assert summary.rows_ok == 6 and made[0].max_attempts == 1
    requests = fake.stats()["requests"]
    assert len(stub.scopes) == len(stub.settled) == requests == 7 and stub.cancelled == 0
    assert stub.settled.count(Outcome.RATE_LIMITED) == 1 and stub.in_flight == 0
    assert set(stub.scopes) == {
        Scope(f"{fake.base_url}/chat/completions", key_digest("sk-scope-123456"), "deepseek-chat")
    }
    assert "sk-scope-123456" not in repr(stub.scopes)
    # uvloop's clock counts whole milliseconds from a large base: 0.2 may come out 0.2 - 1e-12
    assert len(stub.holds) == 1 and 0.2 - 1e-9 <= stub.holds[0] < 1.0


@pytest.mark.parametrize(("lease_seconds", "cut_short"), [(0.3, True), (60.0, False)])
def test_a_send_that_may_outlive_its_lease_goes_under_the_lease_deadline(
    tmp_path: Path, fake: FakeServer, lease_seconds: float, cut_short: bool
) -> None:
    """A lease that may expire before the client's own timeout ends a send puts that send
    under the lease's deadline: a slow answer is cut short (`LeaseExpired`, a timeout) and
    the lease comes back. A lease that outlasts the timeout sends on the fast path, under
    no deadline of its own, and the slow answer arrives."""
    fake.update(latency=1.0)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "question 0"}])
    data = fast_job_data(tmp_path, fake.base_url, limits={"max_attempts": 1, "timeout": 5})
    made: list[LocalRateLimiter] = []

    def make(limits: Limits) -> RateLimiter:
        made.append(LocalRateLimiter(Limiter(concurrency=4), lease_seconds=lease_seconds))
        return made[0]

    summary = run_job(build_job(data), settings=SETTINGS, rate_limiter=make)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    if cut_short:
        assert summary.rows_ok == 0 and rows[0]["error_class"] == "timeout"
        assert "lease" in rows[0]["error"]
    else:
        assert summary.rows_ok == 1 and rows[0]["status"] == "ok"
    assert not made[0]._leases  # every lease closed


def test_an_outage_after_a_fast_first_send_is_cut_short_at_the_lease_expiry(
    tmp_path: Path,
) -> None:
    """A lease that outlasts the client's timeout sends first under no deadline (the fast
    path); when that send finds the endpoint down, waiting for it to come back goes under
    the lease's deadline: the row ends as a timeout (`LeaseExpired`) when the lease
    expires, long before the outage's own bound, and no lease is left open."""
    from tests.test_outage import free_port

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "question 0"}])
    limits = {
        "max_attempts": 1,
        "timeout": 0.5,
        "start_timeout": 15,
        "outage_timeout": 15,
        "initial_backoff": 0.1,
        "max_backoff": 0.1,
    }
    data = fast_job_data(tmp_path, f"http://127.0.0.1:{free_port()}", limits=limits)
    made: list[LocalRateLimiter] = []

    def make(limits: Limits) -> RateLimiter:
        made.append(LocalRateLimiter(Limiter(concurrency=1, adaptive=False), lease_seconds=2.0))
        return made[0]

    started = time.monotonic()
    summary = run_job(build_job(data), settings=SETTINGS, rate_limiter=make)
    took = time.monotonic() - started
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows_ok == 0
    assert rows[0]["error_class"] == "timeout" and "lease" in rows[0]["error"]
    assert took < 10  # the lease's 2 s, not the outage's 15
    assert not made[0]._leases  # every lease closed

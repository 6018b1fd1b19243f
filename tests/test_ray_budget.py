"""The global budget on a local Ray instance: workers in their own processes run real jobs
against the fake on 127.0.0.1, leasing from one `BudgetActor`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from batchrun.fake import FakeServer
from batchrun.job import Limits, build_job
from batchrun.limits import Outcome, Settlement
from batchrun.ratelimit import Scope
from batchrun.ray_budget import LeasedRateLimiter, scope_key, start_budget, stop_budget
from tests.conftest import fast_job_data, write_jsonl

ray = pytest.importorskip("ray")

#: one local Ray instance on 127.0.0.1, shared with the other Ray modules (conftest)
pytestmark = pytest.mark.usefixtures("ray_address")

SCOPE = Scope("http://127.0.0.1:1", "", "deepseek-chat")
_names = iter(range(1_000_000))


def budget(limits: Limits, *, max_cost: float | None = None, **options: Any) -> Any:
    return start_budget(
        limits, max_cost=max_cost, spent_usd=0.0, name=f"budget-{next(_names)}", **options
    )


@ray.remote(num_cpus=1)
def run_worker(data: dict[str, Any], handle: Any, *, shared_cost: bool) -> dict[str, Any]:
    """A worker: runs a job on its own input with the run's limiter (and spend cap)."""
    from batchrun.errors import CostCapReached
    from batchrun.pool import PoolSettings
    from batchrun.ray_budget import worker_limiter, worker_spend_cap
    from batchrun.runner import run_job

    job = build_job(data)
    spend = worker_spend_cap(handle) if shared_cost else None
    limiter = worker_limiter(handle) if handle is not None else None
    settings = PoolSettings(flush_rows=5, flush_seconds=0.05)
    try:
        summary = run_job(job, rate_limiter=limiter, spend_cap=spend, settings=settings)
    except CostCapReached as stopped:
        return {"ok": None, "stopped": "cost_cap", "spent": stopped.spent}
    return {"ok": summary.rows_ok, "stopped": None}


def worker_jobs(
    tmp_path: Path, fake: FakeServer, workers: int, rows: int, **extra: Any
) -> list[dict[str, Any]]:
    """Job data for `workers` workers, each with its own input of `rows` rows."""
    jobs = []
    for worker in range(workers):
        folder = tmp_path / f"w{worker}"
        folder.mkdir()
        prompts = [{"prompt": f"question {worker}-{i}"} for i in range(rows)]
        write_jsonl(folder / "in.jsonl", prompts)
        jobs.append(fast_job_data(folder, fake.base_url, **extra))
    return jobs


def run_workers(jobs: list[dict[str, Any]], handle: Any, *, shared_cost: bool = False) -> list[Any]:
    refs = [run_worker.remote(data, handle, shared_cost=shared_cost) for data in jobs]
    return list(ray.get(refs, timeout=60))


RPM_LIMITS = {"rpm": 40, "window": 1.0, "concurrency": 4}


def test_two_workers_stay_within_the_servers_rpm_together(tmp_path: Path, fake: FakeServer) -> None:
    """Two workers sharing one budget of the server's RPM draw no 429 and finish every row."""
    fake.update(rpm=40, window=1.0, limit_retry="standard")
    jobs = worker_jobs(tmp_path, fake, 2, 40, limits=RPM_LIMITS)
    handle = budget(build_job(jobs[0]).limits)
    try:
        results = run_workers(jobs, handle)
    finally:
        stop_budget(handle)
    stats = fake.stats()
    assert [r["ok"] for r in results] == [40, 40]
    assert stats["rate_limited"] == 0, stats
    assert stats["requests"] == 80


def test_two_workers_with_budgets_of_their_own_overrun_the_server(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The same two workers, each with a local budget of the server's RPM, draw 429s."""
    fake.update(rpm=40, window=1.0, limit_retry="standard", retry_after=0.05)
    jobs = worker_jobs(tmp_path, fake, 2, 40, limits=RPM_LIMITS)
    results = run_workers(jobs, None)
    assert [r["ok"] for r in results] == [40, 40]
    assert fake.stats()["rate_limited"] > 0


def test_two_workers_stay_within_the_servers_tpm_together(tmp_path: Path, fake: FakeServer) -> None:
    """Two workers sharing one TPM budget (prompt + max_tokens) draw no 429."""
    fake.update(tpm=2000, window=1.0, tpm_counts="max_tokens")
    limits = {"tpm": 2000, "tpm_counts": "max_tokens", "window": 1.0, "concurrency": 4}
    jobs = worker_jobs(tmp_path, fake, 2, 30, limits=limits, params={"max_tokens": 20})
    handle = budget(build_job(jobs[0]).limits)
    try:
        results = run_workers(jobs, handle)
    finally:
        stop_budget(handle)
    stats = fake.stats()
    assert [r["ok"] for r in results] == [30, 30]
    assert stats["rate_limited"] == 0, stats


SPEND_CAP = 0.0003  # about 60 rows' cost, under 2 x 60 rows; a row's worst case is 7 x its cost


def paid(jobs: list[dict[str, Any]]) -> float:
    """USD the workers' rows cost, from their part files (or output, once compacted)."""
    total = 0.0
    for data in jobs:
        parts = sorted(Path(data["output"] + ".parts").glob("*.parquet"))
        if Path(data["output"]).exists():
            parts.append(Path(data["output"]))
        total += sum(c or 0.0 for p in parts for c in pq.read_table(p)["cost_usd"].to_pylist())
    return total


def spend_jobs(tmp_path: Path, fake: FakeServer) -> list[dict[str, Any]]:
    extra = {"max_cost": SPEND_CAP, "params": {"max_tokens": 100}, "limits": {"concurrency": 2}}
    return worker_jobs(tmp_path, fake, 2, 60, **extra)


def test_the_spend_cap_holds_across_workers(tmp_path: Path, fake: FakeServer) -> None:
    """Two workers under one max_cost both stop, with the run's spend within it."""
    jobs = spend_jobs(tmp_path, fake)
    handle = budget(build_job(jobs[0]).limits, max_cost=SPEND_CAP)
    try:
        results = run_workers(jobs, handle, shared_cost=True)
    finally:
        stop_budget(handle)
    assert [r["stopped"] for r in results] == ["cost_cap", "cost_cap"]
    assert SPEND_CAP * 0.5 < paid(jobs) <= SPEND_CAP


def test_two_workers_with_spend_caps_of_their_own_overspend(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The same two workers, each with a local cap of max_cost, spend more than it together."""
    jobs = spend_jobs(tmp_path, fake)
    handle = budget(build_job(jobs[0]).limits, max_cost=SPEND_CAP)
    try:
        run_workers(jobs, handle, shared_cost=False)
    finally:
        stop_budget(handle)
    assert paid(jobs) > SPEND_CAP * 1.5


def test_a_429_from_one_worker_pauses_the_others() -> None:
    """A 429 with Retry-After settled by one worker holds another worker's next request."""
    limits = Limits(concurrency=4, adaptive=False)
    handle = budget(limits)

    async def main() -> float:
        first = LeasedRateLimiter(handle, limits)
        second = LeasedRateLimiter(handle, limits)
        lease = await first.reserve(SCOPE, prompt_tokens=10, completion_cap=10)
        await first.settle(lease, Settlement(Outcome.RATE_LIMITED, retry_after=0.5))
        started = time.monotonic()
        await second.reserve(SCOPE, prompt_tokens=10, completion_cap=10)
        return time.monotonic() - started

    try:
        waited = anyio.run(main)
    finally:
        stop_budget(handle)
    assert 0.4 <= waited < 1.5


@ray.remote(num_cpus=0)
class SlotHog:
    """A worker that takes every concurrency slot and never gives one back."""

    def __init__(self, handle: Any, limits: Limits, worker: str = "") -> None:
        self.limiter = LeasedRateLimiter(handle, limits, worker=worker)

    async def take(self, slots: int) -> int:
        for _ in range(slots):
            await self.limiter.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
        return slots


def test_a_dead_workers_slots_return_to_the_pool() -> None:
    """A worker killed holding every slot: its slots come back once its lease expires."""
    limits = Limits(concurrency=2, adaptive=False)
    handle = budget(limits, lease_seconds=1.0)
    hog = SlotHog.remote(handle, limits)
    assert ray.get(hog.take.remote(2)) == 2
    ray.kill(hog)

    async def main() -> float:
        other = LeasedRateLimiter(handle, limits)
        started = time.monotonic()
        with anyio.fail_after(10):
            for _ in range(2):
                await other.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
        return time.monotonic() - started

    try:
        waited = anyio.run(main)
    finally:
        stop_budget(handle)
    assert 0.3 <= waited < 3.0


def test_a_forgotten_workers_slots_return_at_once() -> None:
    """The driver saw a worker's actor die: its slots come back now, not at its lease's end."""
    limits = Limits(concurrency=2, adaptive=False)
    handle = budget(limits, lease_seconds=30.0)
    hog = SlotHog.remote(handle, limits, "batchrun-worker-x-1")
    assert ray.get(hog.take.remote(2)) == 2
    ray.kill(hog)
    assert ray.get(handle.forget.remote("batchrun-worker-x-1/")) == 1

    async def main() -> float:
        other = LeasedRateLimiter(handle, limits)
        started = time.monotonic()
        with anyio.fail_after(10):
            for _ in range(2):
                await other.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
        return time.monotonic() - started

    try:
        waited = anyio.run(main)
    finally:
        stop_budget(handle)
    assert waited < 1.0  # the 30 s lease was not waited out


def test_a_live_worker_keeps_its_slots_while_the_others_wait() -> None:
    """Slots are global: with every slot held by a live worker, another waits for a settle."""
    limits = Limits(concurrency=2, adaptive=False)
    handle = budget(limits)

    async def main() -> tuple[bool, bool]:
        first = LeasedRateLimiter(handle, limits)
        second = LeasedRateLimiter(handle, limits)
        leases = [await first.reserve(SCOPE, prompt_tokens=1, completion_cap=1) for _ in "ab"]
        with anyio.move_on_after(0.8) as waiting:
            await second.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
        await first.settle(leases[0], Settlement(Outcome.OK, prompt_tokens=1, completion_tokens=1))
        with anyio.move_on_after(2.0) as after_settle:
            await second.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
        return waiting.cancelled_caught, after_settle.cancelled_caught

    try:
        blocked, blocked_after = anyio.run(main)
    finally:
        stop_budget(handle)
    assert blocked and not blocked_after


def test_a_remaining_count_of_zero_pauses_the_others_until_its_reset() -> None:
    """An answer saying no request is left holds every worker until its reset."""
    limits = Limits(concurrency=4, adaptive=False)
    handle = budget(limits)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "500ms"}

    async def main() -> float:
        first = LeasedRateLimiter(handle, limits)
        second = LeasedRateLimiter(handle, limits)
        lease = await first.reserve(SCOPE, prompt_tokens=10, completion_cap=10)
        await first.settle(lease, Settlement(Outcome.OK, prompt_tokens=10, headers=headers))
        started = time.monotonic()
        await second.reserve(SCOPE, prompt_tokens=10, completion_cap=10)
        return time.monotonic() - started

    try:
        waited = anyio.run(main)
    finally:
        stop_budget(handle)
    assert 0.4 <= waited < 1.5


def test_a_429_without_a_delay_shrinks_the_runs_learned_concurrency() -> None:
    """A header-less 429 lowers the concurrency every worker shares, not one worker's."""
    limits = Limits(concurrency=16, start_concurrency=10, initial_backoff=0.01)
    handle = budget(limits)

    async def main() -> None:
        worker = LeasedRateLimiter(handle, limits)
        leases = [await worker.reserve(SCOPE, prompt_tokens=1, completion_cap=1) for _ in "abcd"]
        await worker.settle(leases[0], Settlement(Outcome.RATE_LIMITED))

    try:
        before = ray.get(handle.statistics.remote(scope_key(SCOPE)))["concurrency"]
        anyio.run(main)
        after = ray.get(handle.statistics.remote(scope_key(SCOPE)))["concurrency"]
    finally:
        stop_budget(handle)
    assert before == 10
    assert after < 4


def test_a_server_limit_below_the_budget_lowers_it_for_every_worker() -> None:
    """x-ratelimit-limit-requests under the configured rpm becomes the run's rpm."""
    limits = Limits(concurrency=4, rpm=600, adaptive=False)
    handle = budget(limits)

    async def main() -> None:
        worker = LeasedRateLimiter(handle, limits)
        lease = await worker.reserve(SCOPE, prompt_tokens=1, completion_cap=1)
        headers = {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "50"}
        await worker.settle(lease, Settlement(Outcome.OK, prompt_tokens=1, headers=headers))

    try:
        anyio.run(main)
        stats = ray.get(handle.statistics.remote(scope_key(SCOPE)))
    finally:
        stop_budget(handle)
    assert stats["rpm_limit"] == 120


def test_a_429_without_a_delay_right_after_a_pause_doubles_the_shared_pause() -> None:
    """Refused again just after the shared pause: the next pause is twice as long."""
    handle = budget(Limits(concurrency=4, adaptive=False, initial_backoff=0.2))
    key = scope_key(SCOPE)
    try:
        first = ray.get(handle.rate_limited.remote("w", key, retry_after=None, in_flight=1))
        during = ray.get(handle.rate_limited.remote("w", key, retry_after=None, in_flight=1))
        time.sleep(0.25)
        again = ray.get(handle.rate_limited.remote("w", key, retry_after=None, in_flight=1))
    finally:
        stop_budget(handle)
    # the actor answers a pause's length from two clock readings: allow a rounding hair
    assert 0.1 < first <= 0.2 + 1e-6
    assert during <= first + 1e-6  # the same round: the pause is not extended
    assert 0.3 < again <= 0.4 + 1e-6

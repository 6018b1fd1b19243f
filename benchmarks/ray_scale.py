"""Rows/s on Ray with 1, 2 and 4 workers under one global budget, next to the single-process
engine, against the fake in its own process on 127.0.0.1.

Each worker is a Ray task running a real job (reading, retries, journal, compaction) on its
own slice of the input, leasing from the run's `BudgetActor` (`ray_budget.worker_limiter`),
as the engine's workers do. Two cases:

- zero-latency fake, no budget: rows/s (what the machinery costs; on a 2-core machine the
  workers, the fake and the actor share two cores);
- a fixed RPM budget equal to the fake's RPM (sliding window): the share of it used over the
  steady part of the run, and the 429s the fake sent (the budget holds if there are none).

    python benchmarks/ray_scale.py [--rows 2000] [--rpm-rows 600] [--window 5] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import ray
from rate_budget import Fake  # a sibling script: run from the benchmarks folder or as a path

from batchrun import logs
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.ray_budget import start_budget, stop_budget, worker_limiter
from batchrun.runner import run_job

RATE = 40.0  # the fake's RPM case: requests a second, whatever the window


def write_inputs(folder: Path, rows: int, workers: int) -> list[Path]:
    """The input cut into `workers` contiguous slices, one file each."""
    paths = []
    per = -(-rows // workers)
    for worker in range(workers):
        path = folder / f"in-{worker}.jsonl"
        first, last = worker * per, min(rows, (worker + 1) * per)
        path.write_bytes(
            b"".join(orjson.dumps({"prompt": f"question {i}"}) + b"\n" for i in range(first, last))
        )
        paths.append(path)
    return paths


def job_data(source: Path, base_url: str, limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": str(source),
        "output": str(source.with_suffix(".parquet")),
        "base_url": base_url,
        "limits": {"initial_backoff": 0.05, "max_backoff": 1.0, **limits},
    }


def run_local(data: dict[str, Any]) -> int:
    return run_job(build_job(data), restart=True, settings=PoolSettings()).rows_ok


@ray.remote(num_cpus=1)
def run_worker(data: dict[str, Any], handle: Any) -> int:
    logs.configure(verbosity=-1)
    job = build_job(data)
    return run_job(
        job, restart=True, rate_limiter=worker_limiter(handle), settings=PoolSettings()
    ).rows_ok


def finish_times(outputs: list[Path]) -> list[float]:
    stamps = []
    for output in outputs:
        for stamp in pq.read_table(output, columns=["finished_at"])["finished_at"].to_pylist():
            stamps.append(stamp.timestamp())
    return sorted(stamps)


def measure(
    folder: Path, base_url: str, rows: int, workers: int | None, limits: dict[str, Any]
) -> tuple[float, list[float]]:
    """Seconds for `rows` rows on `workers` Ray workers (None: the single-process engine),
    and the rows' finish times."""
    case = folder / f"w{workers or 0}"
    case.mkdir()
    sources = write_inputs(case, rows, workers or 1)
    jobs = [job_data(source, base_url, limits) for source in sources]
    started = time.perf_counter()
    if workers is None:
        done = run_local(jobs[0])
    else:
        handle = start_budget(
            build_job(jobs[0]).limits, max_cost=None, spent_usd=0.0, name=f"bench-{workers}"
        )
        try:
            done = sum(ray.get([run_worker.remote(data, handle) for data in jobs]))
        finally:
            stop_budget(handle)
    seconds = time.perf_counter() - started
    assert done == rows, (done, rows)
    return seconds, finish_times([source.with_suffix(".parquet") for source in sources])


def steady_rate(stamps: list[float]) -> float:
    """Rows a second from the first finish to the last."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rpm-rows", type=int, default=600)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    logs.configure(verbosity=-1)
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=max(args.workers),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    # warm the worker processes, so start-up is not counted against the first case
    ray.get([ray.remote(num_cpus=1)(lambda: None).remote() for _ in range(max(args.workers))])
    engines: list[int | None] = [None, *args.workers]
    name = {None: "single process"} | {w: f"ray, {w} worker(s)" for w in args.workers}

    print(f"zero-latency fake, no budget, {args.rows} rows")
    print(f"{'engine':<22}{'rows/s':>10}{'seconds':>10}")
    fake = Fake()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workers in engines:
                seconds, _ = measure(
                    Path(tmp), fake.base_url, args.rows, workers, {"concurrency": 32}
                )
                print(f"{name[workers]:<22}{args.rows / seconds:>10.0f}{seconds:>10.2f}")
    finally:
        fake.stop()

    per_window = RATE * args.window
    print(
        f"\nRPM budget = the fake's RPM ({per_window:.0f} per {args.window:g} s sliding window), "
        f"{args.rpm_rows} rows"
    )
    print(f"{'engine':<22}{'share used':>12}{'429s':>8}{'rows ok':>9}")
    for workers in engines:
        fake = Fake("--rpm", str(int(per_window)), "--window", str(args.window))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                limits = {"rpm": per_window, "window": args.window, "concurrency": 32}
                _, stamps = measure(Path(tmp), fake.base_url, args.rpm_rows, workers, limits)
                stats = fake.stats()
            share = steady_rate(stamps) * args.window / per_window
            print(f"{name[workers]:<22}{share:>12.1%}{stats['rate_limited']:>8}{len(stamps):>9}")
        finally:
            fake.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()

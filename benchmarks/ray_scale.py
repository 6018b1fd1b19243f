"""Rows/s with `--engine ray` and 1, 2 and 4 workers under one global budget, next to the
single-process engine, against the fake in its own process on 127.0.0.1.

Each case is a real job (scan, shards, worker actors leasing from the run's budget actor,
journals, compaction) run through `run_job`; the Ray cases start their own local Ray instance
on 127.0.0.1, as `batchrun run --engine ray` does. Rows/s is measured from the rows' own finish
times (first to last), so Ray's start-up is left out of it; the wall time, start-up included,
is printed beside it. Two cases:

- zero-latency fake, no budget: rows/s (what the machinery costs; on a 2-core machine the
  workers, the driver, the fake and the budget actor share two cores);
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
from rate_budget import Fake  # a sibling script: run from the benchmarks folder or as a path

from batchrun import logs
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job

RATE = 40.0  # the fake's RPM case: requests a second, whatever the window


def write_input(folder: Path, rows: int) -> Path:
    path = folder / "in.jsonl"
    path.write_bytes(
        b"".join(orjson.dumps({"id": i, "prompt": f"question {i}"}) + b"\n" for i in range(rows))
    )
    return path


def measure(
    folder: Path, base_url: str, rows: int, workers: int | None, limits: dict[str, Any]
) -> tuple[float, list[float]]:
    """Wall seconds for `rows` rows on `workers` Ray workers (None: the single-process
    engine), and the rows' finish times."""
    case = folder / f"w{workers or 0}"
    case.mkdir()
    source = write_input(case, rows)
    data: dict[str, Any] = {
        "input": str(source),
        "output": str(case / "out.parquet"),
        "base_url": base_url,
        "limits": {"initial_backoff": 0.05, "max_backoff": 1.0, **limits},
    }
    if workers is not None:
        data |= {"engine": "ray", "ray": {"workers": workers}}
    started = time.perf_counter()
    done = run_job(build_job(data), restart=True, settings=PoolSettings()).rows_ok
    seconds = time.perf_counter() - started
    assert done == rows, (done, rows)
    stamps = pq.read_table(case / "out.parquet", columns=["finished_at"])["finished_at"]
    return seconds, sorted(stamp.timestamp() for stamp in stamps.to_pylist())


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
    engines: list[int | None] = [None, *args.workers]
    name = {None: "single process"} | {w: f"ray, {w} worker(s)" for w in args.workers}

    print(f"zero-latency fake, no budget, {args.rows} rows")
    print(f"{'engine':<22}{'rows/s':>10}{'wall s':>10}")
    fake = Fake()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workers in engines:
                seconds, stamps = measure(
                    Path(tmp), fake.base_url, args.rows, workers, {"concurrency": 32}
                )
                print(f"{name[workers]:<22}{steady_rate(stamps):>10.0f}{seconds:>10.2f}")
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


if __name__ == "__main__":
    main()

"""How much of a rate budget the runner uses, and how many 429s it draws, in three cases.

The fake runs in its own process with its own limits over a shortened window; the runner
runs a real job against it. For each case it prints the share of the server's limit achieved
(at the steady pace, from the rows' finish times) and the 429s the server sent.

1. runner budget = server RPM (and, separately, TPM counted as prompt + max_tokens)
2. runner budget 50% above the server's RPM, with x-ratelimit-* headers on
3. a server limited to C concurrent requests, no headers: adaptive concurrency

    python benchmarks/rate_budget.py [--window 5] [--requests 1500]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow.parquet as pq

from batchrun import logs
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fake:
    """The fake server in its own process."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batchrun", "fake-server", "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base_url}/models", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("the fake server did not start")

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base_url}/stats", timeout=5).json())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def run(fake: Fake, rows: list[dict[str, Any]], tmp: Path, **limits: Any) -> list[dict[str, Any]]:
    source = tmp / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    job = build_job(
        {
            "input": str(source),
            "output": str(tmp / "out.parquet"),
            "base_url": fake.base_url,
            "params": {"max_tokens": 100},
            "limits": {"max_attempts": 10, "initial_backoff": 0.05, **limits},
        }
    )
    summary = run_job(job, restart=True, settings=PoolSettings())
    assert summary.rows_ok == len(rows), summary
    return list(pq.read_table(tmp / "out.parquet").to_pylist())


def steady(out: list[dict[str, Any]], weight: Any = None) -> float:
    """Units per second over the run, from the first to the last finish."""
    rows = sorted(out, key=lambda r: r["finished_at"])
    seconds = (rows[-1]["finished_at"] - rows[0]["finished_at"]).total_seconds()
    units = sum(weight(r) for r in rows[1:]) if weight else len(rows) - 1
    return float(units / seconds)


def report(name: str, achieved: float, fake: Fake, n: int) -> None:
    stats = fake.stats()
    rate_limited = stats["rate_limited"]
    print(
        f"{name:<44}{achieved:>9.1%}{rate_limited:>7}{rate_limited / stats['requests']:>9.2%}{n:>7}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=5.0, help="seconds standing for a minute")
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    logs.configure(verbosity=-1)
    window, n = args.window, args.requests
    short = [{"prompt": f"question {i}"} for i in range(n)]
    mixed = [{"prompt": "word " * (5 + (i * 37) % 300)} for i in range(n)]

    print(f"window {window:g} s standing for a minute; {n} requests a case")
    print(f"{'case':<44}{'of limit':>9}{'429s':>7}{'429 rate':>9}{'rows':>7}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rpm = 60 * 20  # 20 requests/s of a 60 s minute, whatever the window
        per_window = rpm * window / 60
        fake = Fake("--rpm", str(int(per_window)), "--window", str(window), "--no-rate-headers")
        try:
            out = run(fake, short, tmp, rpm=per_window, window=window, concurrency=32)
            report("1. RPM budget = server limit", steady(out) * window / per_window, fake, n)
        finally:
            fake.stop()

        tpm = 20_000 * window
        fake = Fake("--tpm", str(int(tpm)), "--window", str(window), "--no-rate-headers")
        try:
            out = run(
                fake, mixed, tmp, tpm=tpm, window=window, tpm_counts="max_tokens", concurrency=32
            )
            charged = steady(out, weight=lambda r: r["prompt_tokens"] + 100)
            report("1. TPM budget = server limit (mixed prompts)", charged * window / tpm, fake, n)
        finally:
            fake.stop()

        fake = Fake("--rpm", str(int(per_window)), "--window", str(window), "--rate-headers")
        try:
            out = run(fake, short, tmp, rpm=per_window * 1.5, window=window, concurrency=32)
            report(
                "2. RPM budget 50% above, headers on", steady(out) * window / per_window, fake, n
            )
        finally:
            fake.stop()

        limit, latency = 16, 0.2
        fake = Fake("--max-concurrency", str(limit), "--latency", str(latency), "--no-rate-headers")
        try:
            out = run(fake, short, tmp, concurrency=64)
            report(
                f"3. server concurrency {limit}, adaptive (C/latency)",
                steady(out) / (limit / latency),
                fake,
                n,
            )
        finally:
            fake.stop()


if __name__ == "__main__":
    main()

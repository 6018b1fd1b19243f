"""How much of a rate budget the runner uses, and how many 429s it draws, case by case.

The fake runs in its own process with its own limits over a shortened window (a ratio does
not depend on the window's length); the runner runs a real job against it. Each case prints
the share of the server's limit used, the target the issue sets, the 429s the server sent
and the rows that ended ok, side by side:

- RPM budget = the server's RPM (sliding window): >= 97% used, <= 1% 429s
- TPM budget = the server's TPM, counted on real usage, no max_tokens: >= 90%, <= 1% 429s
- TPM budget = the server's TPM counted as prompt + max_tokens (OpenAI)
- RPM budget 50% above the server's, x-ratelimit-* headers on
- fixed-window RPM server (resets on the window), 429s with Retry-After, no budget given
- header-less RPM window server (no Retry-After, no rate headers), no budget given:
  every row ok, <= 30% of requests answered 429, >= 60% of its rate used
- a concurrency limit without headers: >= 95% of C/latency, <= 1% 429s
- DeepSeek's scale: 2,500 slots, 5-6 s answers, `concurrency = 2500`, 10,000 rows:
  >= 60% of C/latency over the whole run, <= 1% 429s

    python benchmarks/rate_budget.py [--window 5] [--requests 800] [--only NAME]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


Rows = list[dict[str, Any]]


@dataclass
class Outcome:
    rows: Rows
    rows_ok: int
    seconds: float


@dataclass
class Case:
    name: str
    fake: list[str]
    inputs: Rows
    limits: dict[str, Any]
    #: share of the server's limit used, from the output rows and the run's wall time
    used: Callable[[Outcome], float]
    target: str
    params: dict[str, Any] = field(default_factory=dict)


def run(case: Case, tmp: Path) -> tuple[Outcome, dict[str, Any]]:
    fake = Fake(*case.fake)
    try:
        source = tmp / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in case.inputs))
        job = build_job(
            {
                "input": str(source),
                "output": str(tmp / "out.parquet"),
                "base_url": fake.base_url,
                "params": case.params,
                # the default max_attempts: rate-limit waits do not consume attempts;
                # backoffs scaled down with the window
                "limits": {
                    "initial_backoff": 0.05,
                    "max_backoff": 1.0,
                    **case.limits,
                },
            }
        )
        started = time.perf_counter()
        summary = run_job(job, restart=True, settings=PoolSettings())
        seconds = time.perf_counter() - started
        rows = list(pq.read_table(tmp / "out.parquet").to_pylist())
        return Outcome(rows, summary.rows_ok, seconds), fake.stats()
    finally:
        fake.stop()


def steady(rows: Rows, weight: Callable[[dict[str, Any]], float] | None = None) -> float:
    """Units per second from the first finish to the last."""
    ordered = sorted(rows, key=lambda r: r["finished_at"])
    seconds = (ordered[-1]["finished_at"] - ordered[0]["finished_at"]).total_seconds()
    units = sum(weight(r) for r in ordered[1:]) if weight else len(ordered) - 1
    return float(units / seconds)


def usage(row: dict[str, Any]) -> float:
    return float((row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0))


def cases(window: float, n: int) -> list[Case]:
    rate = 40.0  # requests a second, whatever the window
    per_window = rate * window
    rpm = ["--rpm", str(int(per_window)), "--window", str(window)]
    short = [{"prompt": f"question {i}"} for i in range(n)]
    mixed = [{"prompt": "word " * (5 + (i * 37) % 300)} for i in range(n)]
    tpm = 40_000 * window  # tokens a second x window
    limit, latency = 16, 0.2
    big, slow = 2500, 5.0
    return [
        Case(
            "RPM budget = server RPM",
            [*rpm, "--no-rate-headers"],
            short,
            {"rpm": per_window, "window": window, "concurrency": 32},
            lambda o: steady(o.rows) * window / per_window,
            ">=97%, <=1% 429",
        ),
        Case(
            "TPM = server TPM on usage, no max_tokens",
            ["--tpm", str(int(tpm)), "--window", str(window), "--tpm-counts", "usage"],
            mixed,
            {"tpm": tpm, "window": window, "concurrency": 64},
            lambda o: steady(o.rows, usage) * window / tpm,
            ">=90%, <=1% 429",
        ),
        Case(
            "TPM = server TPM, prompt + max_tokens",
            ["--tpm", str(int(tpm)), "--window", str(window), "--no-rate-headers"],
            mixed,
            {"tpm": tpm, "window": window, "tpm_counts": "max_tokens", "concurrency": 32},
            lambda o: steady(o.rows, lambda r: r["prompt_tokens"] + 100) * window / tpm,
            "",
            params={"max_tokens": 100},
        ),
        Case(
            "RPM budget 50% above, headers on",
            [*rpm, "--rate-headers"],
            short,
            {"rpm": per_window * 1.5, "window": window, "concurrency": 32},
            lambda o: steady(o.rows) * window / per_window,
            "",
        ),
        Case(
            "fixed-window RPM, Retry-After, no budget",
            [*rpm, "--fixed-window", "--no-rate-headers"],
            short,
            {"window": window},
            lambda o: steady(o.rows) * window / per_window,
            "(bursts at resets)",
        ),
        Case(
            "header-less RPM window, no budget",
            [*rpm, "--no-rate-headers", "--limit-retry", "none"],
            short,
            {"window": window},
            lambda o: steady(o.rows) * window / per_window,
            "all ok, <=30% 429, >=60%",
        ),
        Case(
            f"concurrency {limit} w/o headers (C/latency)",
            ["--max-concurrency", str(limit), "--latency", str(latency), "--no-rate-headers"],
            short,
            {},
            lambda o: steady(o.rows) / (limit / latency),
            ">=95%, <=1% 429",
        ),
        Case(
            f"{big} slots, 5-6 s, concurrency {big}",
            [
                "--max-concurrency",
                str(big),
                "--latency",
                str(slow),
                "--latency-jitter",
                "1",
                "--no-rate-headers",
            ],
            [{"prompt": f"q{i}"} for i in range(10_000)],
            {"concurrency": big, "timeout": 60},
            lambda o: len(o.rows) / o.seconds / (big / (slow + 0.5)),
            ">=60% whole run, <=1%",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=5.0, help="seconds standing for a minute")
    parser.add_argument("--requests", type=int, default=800, help="rows a case (not the last)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    logs.configure(verbosity=-1)
    chosen = [c for c in cases(args.window, args.requests) if args.only.lower() in c.name.lower()]
    print(f"window {args.window:g} s standing for a minute")
    header = f"{'case':<44}{'used':>7}  {'target':<24}{'429s':>6}{'429 rate':>9}{'ok':>7}{'s':>6}"
    print(header)
    for case in chosen:
        with tempfile.TemporaryDirectory() as tmp_name:
            outcome, stats = run(case, Path(tmp_name))
        limited = stats["rate_limited"]
        share = limited / max(1, stats["requests"])
        print(
            f"{case.name:<44}{case.used(outcome):>7.1%}  {case.target:<24}{limited:>6}"
            f"{share:>9.2%}{outcome.rows_ok:>7}{outcome.seconds:>6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

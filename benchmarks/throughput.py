"""Throughput of the whole runner against the zero-latency fake, for both transports.

The fake runs in its own process (one core); the runner in this one (the other core). For each
concurrency and transport it runs a real job (reading, retries, writing, compaction) and prints
requests/s and the time per request; beside it, a bare loop of client.post calls with no runner
around them, to show what the runner itself costs.

    python benchmarks/throughput.py [--requests 20000] [--concurrency 64 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio
import httpx
import orjson

from batchrun import logs
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fake(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "fake-server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/models", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the fake server did not start")


def write_prompts(path: Path, n: int) -> None:
    with path.open("wb") as file:
        for i in range(n):
            file.write(orjson.dumps({"id": f"r{i}", "prompt": f"Say something about {i}."}))
            file.write(b"\n")


def run_runner(
    base_url: str, prompts: Path, out: Path, *, transport: str, concurrency: int, requests: int
) -> float:
    job = build_job(
        {
            "input": str(prompts),
            "output": str(out),
            "base_url": base_url,
            "transport": transport,
            "limit": requests,
            "prompt": {"id_column": "id"},
            "params": {"max_tokens": 64},
            "limits": {"concurrency": concurrency},
        }
    )
    start = time.perf_counter()
    summary = run_job(job, restart=True, settings=PoolSettings())
    elapsed = time.perf_counter() - start
    assert summary.rows_ok == requests, summary
    return elapsed


async def bare_loop(base_url: str, *, transport: str, concurrency: int, requests: int) -> float:
    """Only client.post calls: the transport's own ceiling, no runner around it."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=60)
    else:
        client = httpx.AsyncClient(limits=limits, timeout=60)
    body = orjson.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]})
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            response = await client.post(f"{base_url}/chat/completions", content=body)
            orjson.loads(response.content)

    async with client:
        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--transports", nargs="+", default=["aiohttp", "httpx"])
    args = parser.parse_args()
    logs.configure(verbosity=-1)

    port = free_port()
    fake = start_fake(port)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            write_prompts(prompts, args.requests)
            print(
                f"{args.requests} requests per run, zero-latency fake in its own process, "
                f"{os.cpu_count()} cores"
            )
            print(
                f"{'transport':<10}{'conc':>6}{'runner req/s':>14}{'us/req':>9}"
                f"{'bare client req/s':>19}{'bare us/req':>13}"
            )
            for concurrency in args.concurrency:
                for transport in args.transports:
                    n = args.requests if transport == "aiohttp" else args.requests // 4
                    wall = run_runner(
                        base_url,
                        prompts,
                        Path(tmp) / "out.parquet",
                        transport=transport,
                        concurrency=concurrency,
                        requests=n,
                    )
                    bare = anyio.run(
                        partial(
                            bare_loop,
                            base_url,
                            transport=transport,
                            concurrency=concurrency,
                            requests=n,
                        )
                    )
                    print(
                        f"{transport:<10}{concurrency:>6}{n / wall:>14.0f}"
                        f"{wall / n * 1e6:>9.0f}{n / bare:>19.0f}{bare / n * 1e6:>13.0f}"
                    )
    finally:
        fake.terminate()
        fake.wait(timeout=10)


if __name__ == "__main__":
    main()

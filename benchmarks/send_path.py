"""The send path's own cost: `Client.send` beside a bare aiohttp session, in one process.

Starts the fake in its own process (pinned to the first core where there are two, this one to
the second), then in one uvloop loop sends N requests at concurrency C through
`batchrun.client.Client.send` and N through a bare `aiohttp.ClientSession` (the same body,
the answer parsed with orjson), alternating for a few rounds. Prints the CPU microseconds a
request of each (this process's user + system time, the fake's excluded) and the difference:
what the send path adds on top of aiohttp and the event loop. No asserts.

    python benchmarks/send_path.py [--requests 5000] [--concurrency 64] [--rounds 3]
                                   [--transport aiohttp|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import orjson


def body(i: int) -> dict[str, object]:
    return {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": f"Say something about {i}."}],
    }


async def drive(n: int, concurrency: int, send: Callable[[int], Awaitable[object]]) -> float:
    """CPU seconds of this process to send n requests, `concurrency` at a time."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await send(i)

    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - start


async def main(base_url: str, args: argparse.Namespace) -> None:
    import aiohttp

    from batchrun.client import Client

    url = base_url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    headers = {"content-type": "application/json", "authorization": "Bearer bench-key-0123"}
    ours: list[float] = []
    bare: list[float] = []
    async with (
        aiohttp.ClientSession(connector=connector, headers=headers) as session,
        Client(
            base_url,
            api_key="bench-key-0123",
            max_connections=args.concurrency,
            transport=args.transport,
        ) as client,
    ):

        async def bare_send(i: int) -> object:
            async with session.post(url, data=orjson.dumps(body(i))) as response:
                answer = orjson.loads(await response.read())
            return answer["choices"][0]["message"]

        async def client_send(i: int) -> object:
            return await client.send(body(i))

        await drive(500, args.concurrency, bare_send)  # warm both pools
        await drive(500, args.concurrency, client_send)
        for _ in range(args.rounds):
            bare.append(await drive(args.requests, args.concurrency, bare_send))
            ours.append(await drive(args.requests, args.concurrency, client_send))
    per = 1e6 / args.requests
    ours_us = statistics.median(ours) * per
    bare_us = statistics.median(bare) * per
    print(
        f"{args.requests:,} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
        f"transport {args.transport}, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"bare aiohttp      {bare_us:7.1f} us CPU a request  (rounds {fmt(bare, per)})")
    print(f"Client.send       {ours_us:7.1f} us CPU a request  (rounds {fmt(ours, per)})")
    print(f"send path adds    {ours_us - bare_us:7.1f} us a request (medians)")
    print(f"least of rounds   bare {min(bare) * per:.1f}, Client.send {min(ours) * per:.1f}")


def fmt(values: list[float], per: float) -> str:
    return " ".join(f"{value * per:.1f}" for value in values)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transport", default="aiohttp", choices=["aiohttp", "httpx"])
    parser.add_argument("--port", type=int, default=0, help="a fake already running there")
    args = parser.parse_args()
    from throughput import cores, free_port, start_fake  # the sibling benchmark

    fake_core, own_core = cores()
    port = args.port or free_port()
    fake = None if args.port else start_fake(port, fake_core)
    if (
        own_core is not None
    ):  # the fake on the first core (or where it was started), this on the second
        os.sched_setaffinity(0, own_core)
    try:
        import uvloop

        uvloop.run(main(f"http://127.0.0.1:{port}", args))
    finally:
        if fake is not None:
            fake.terminate()
            fake.wait(timeout=10)

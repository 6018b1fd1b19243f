"""The yardstick for batchrun's own cost: a bare aiohttp loop with nothing around it.

Reads the same JSONL prompts as a batchrun job (`{"id": ..., "prompt": ...}` a line), sends
each as a chat completion with at most CONCURRENCY in flight, and writes one JSONL line of
results a row. No retries, no rate budget, no checkpoint, no Parquet.

    python benchmarks/bare_aiohttp.py BASE_URL PROMPTS.jsonl OUT.jsonl [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import BinaryIO

import aiohttp
import orjson


async def worker(
    session: aiohttp.ClientSession, url: str, model: str, queue: asyncio.Queue[bytes], out: BinaryIO
) -> None:
    while not queue.empty():
        row = orjson.loads(queue.get_nowait())
        body = {"model": model, "messages": [{"role": "user", "content": row["prompt"]}]}
        async with session.post(url, data=orjson.dumps(body)) as response:
            answer = orjson.loads(await response.read())
        message = answer["choices"][0]["message"]
        out.write(
            orjson.dumps(
                {
                    "id": row["id"],
                    "status": response.status,
                    "content": message.get("content"),
                    "usage": answer.get("usage"),
                }
            )
            + b"\n"
        )


async def main(
    base_url: str, lines: list[bytes], out: BinaryIO, concurrency: int, model: str
) -> None:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for line in lines:
        queue.put_nowait(line)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"content-type": "application/json", "authorization": "Bearer bench"}
    url = base_url.rstrip("/") + "/chat/completions"
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        await asyncio.gather(*(worker(session, url, model, queue, out) for _ in range(concurrency)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("prompts")
    parser.add_argument("output")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", default="deepseek-chat")
    args = parser.parse_args()
    with open(args.prompts, "rb") as file:
        lines = [line for line in file if line.strip()]
    with open(args.output, "wb") as out:
        asyncio.run(main(args.base_url, lines, out, args.concurrency, args.model))

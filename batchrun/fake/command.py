"""`batchrun fake-server`: run the fake from the command line.

Imports only click and the standard library at import time, so `batchrun --help` stays
instant; the server (aiohttp, orjson) is imported when the command runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click


def _faults(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


# Options default to None and only the given ones reach FakeConfig, so its defaults live in
# one place (batchrun/fake/config.py); the help texts quote them.
@click.command("fake-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to bind.")
@click.option("--latency", type=float, help="Seconds before each answer (default 0).")
@click.option("--latency-jitter", type=float, help="Extra random 0..J seconds (default 0).")
@click.option("--fail-rate", type=float, help="Probability of a random fault (default 0).")
@click.option(
    "--faults",
    callback=_faults,
    help="Comma list of fault kinds mixed by --fail-rate "
    "(default 429,500,503,drop,blank,keepalive; also 400,404,422,502,504,truncated,isr).",
)
@click.option("--seed", type=int, help="Seed for faults and jitter (default 0).")
@click.option("--retry-after", type=float, help="Retry-After seconds on 429 faults (default 1).")
@click.option("--api-key", help="Key the server requires as 'Bearer KEY' (default: none).")
@click.option("--token-budget", type=int, help="Tokens served before answering 402.")
@click.option("--keepalive-lines", type=int, help="Blank lines before a keepalive answer (3).")
@click.option("--keepalive-interval", type=float, help="Seconds between keepalive lines (0).")
@click.option("--rpm", type=int, help="Requests per window before 429.")
@click.option("--tpm", type=int, help="Tokens per window before 429 (see --tpm-counts).")
@click.option("--max-concurrency", type=int, help="Requests in flight before 429.")
@click.option("--window", type=float, help="Rate-limit window in seconds (default 60).")
@click.option(
    "--rate-headers/--no-rate-headers",
    default=None,
    help="Send x-ratelimit-* headers when limits are set (default on).",
)
@click.option(
    "--reset-headers/--no-reset-headers",
    default=None,
    help="Include x-ratelimit-reset-* in the rate headers (default on).",
)
@click.option(
    "--tpm-counts",
    type=click.Choice(["max_tokens", "usage"]),
    help="TPM counts prompt + max_tokens on admission (default), or the prompt on admission "
    "and the completion when served.",
)
@click.option(
    "--fixed-window/--sliding-window",
    default=None,
    help="Rate counts reset at every multiple of --window, or slide (default).",
)
@click.option(
    "--limit-retry",
    type=click.Choice(["standard", "vendor", "none"]),
    help="What a rate-limit 429 carries: Retry-After (default), only llm_provider-retry-after, "
    "or no delay at all.",
)
@click.option(
    "--usage-chunk",
    type=click.Choice(["final", "separate"]),
    help="Streaming usage on the finish chunk (DeepSeek, default) or a separate one (OpenAI).",
)
@click.option(
    "--usage",
    type=click.Choice(["full", "no_cache", "omit"]),
    help="Usage in answers: all fields (default), without the cache split, or none at all.",
)
@click.option(
    "--echo-auth",
    is_flag=True,
    default=None,
    help="Repeat the Authorization header in every answer (to test secret redaction).",
)
def fake_server_command(host: str, port: int, **options: Any) -> None:
    """Run a fake DeepSeek-compatible API server, for tests and benchmarks."""
    from batchrun.fake.config import FakeConfig
    from batchrun.fake.server import serve

    given = {name: value for name, value in options.items() if value is not None}
    try:
        config = FakeConfig(**given)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        serve(config, host=host, port=port)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        click.echo(f"error: cannot listen on {host}:{port}: {reason}", err=True)
        sys.exit(2)

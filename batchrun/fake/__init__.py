"""A fake DeepSeek-compatible server for tests and benchmarks; shares no code with the client.

`FakeConfig` and `fake_server_command` are cheap to import (stdlib and click only);
`FakeServer` and `serve` pull in aiohttp, so they load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrun.fake.command import fake_server_command
from batchrun.fake.config import FakeConfig

if TYPE_CHECKING:
    from batchrun.fake.server import FakeServer, serve

__all__ = ["FakeConfig", "FakeServer", "fake_server_command", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy: importing aiohttp here would slow `batchrun --help`, which imports the command.
    if name in ("FakeServer", "serve"):
        from batchrun.fake import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

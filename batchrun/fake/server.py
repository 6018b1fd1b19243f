"""Running the fake: `FakeServer` (a background thread, for tests) and `serve` (for the CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from batchrun.fake.app import make_app
from batchrun.fake.config import FakeConfig
from batchrun.fake.state import FakeState

#: Seconds `stop()` lets handlers still sleeping on latency finish before cancelling them.
SHUTDOWN_TIMEOUT = 1.0
_T = TypeVar("_T")


def _runner(state: FakeState) -> web.AppRunner:
    # No access log: at thousands of requests a second, logging each one costs more than
    # answering it.
    return web.AppRunner(make_app(state), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)


class FakeServer:
    """The fake on 127.0.0.1 and a free port, served from a background thread.

    ```python
    with FakeServer(FakeConfig(latency=0.01)) as fake:
        httpx.post(fake.base_url + "/chat/completions", json=body)
    ```
    The helpers (`stats`, `requests`, `reset`, `update`) run on the server's loop, so they are
    safe to call from the test's thread while requests are in flight.
    """

    def __init__(self, config: FakeConfig | None = None) -> None:
        self._state = FakeState(config if config is not None else FakeConfig())
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port: int | None = None

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("FakeServer is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`; `/v1` paths are served too."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> FakeConfig:
        """The config in force."""
        return self._state.config

    def start(self) -> FakeServer:
        """Start serving; returns once the port is listening.

        After `stop()`, starts again on the same port (an endpoint that went away and came
        back), with its counters and log as they were.
        """
        if self._thread is not None:
            raise RuntimeError("FakeServer is already started")
        self._ready.clear()
        self._error = None
        thread = threading.Thread(target=self._run, name="fake-deepseek", daemon=True)
        self._thread = thread
        thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("FakeServer did not start within 30 s")
        if self._error is not None:
            thread.join()
            self._thread = None
            raise RuntimeError("FakeServer failed to start") from self._error
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread to finish (idempotent)."""
        thread = self._thread
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended on its own
                loop.call_soon_threadsafe(stopping.set)
        thread.join()
        self._thread = None
        self._loop = None  # the port is kept: start() comes back on it
        self._stopping = None
        if self._error is not None:
            raise RuntimeError("FakeServer failed while stopping") from self._error

    def stats(self) -> dict[str, Any]:
        """The same document as `GET /stats`."""
        return self._call(self._state.stats)

    def requests(self) -> list[Any]:
        """The logged chat request bodies, in arrival order (no headers, so no keys)."""
        return self._call(lambda: list(self._state.log))

    def reset(self, config: FakeConfig | None = None) -> None:
        """Clear counters, log, scripts, spend, cache and windows; optionally swap the config."""
        self._call(lambda: self._state.reset(config))

    def update(self, **fields: Any) -> FakeConfig:
        """Change config fields live (validated), e.g. `update(token_budget=10_000)`."""
        new = dataclasses.replace(self._state.config, **fields)
        self._call(lambda: self._state.set_config(new))
        return new

    def _call(self, fn: Callable[[], _T]) -> _T:
        loop = self._loop
        if loop is None or self._thread is None:
            return fn()

        async def on_loop() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the caller of start() or stop()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        runner = _runner(self._state)
        await runner.setup()
        loop = asyncio.get_running_loop()
        # our own listening socket, so that a stop can stop accepting before it closes: a
        # connection accepted in the same loop step as asyncio's Server.close() can no longer
        # attach to it and its socket is leaked (a ResourceWarning in whichever test runs
        # next), which a fake stopped mid-run, under load, hits
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self._port or 0))
        except OSError:
            listener.close()
            raise
        try:
            site = web.SockSite(runner, listener)
            await site.start()
            self._port = int(listener.getsockname()[1])
            self._stopping = asyncio.Event()
            self._loop = loop
            self._ready.set()
            await self._stopping.wait()
        finally:
            with contextlib.suppress(ValueError, OSError):  # not serving (start failed)
                loop.remove_reader(listener.fileno())
            await asyncio.sleep(0)  # connections already accepted attach to the server
            await asyncio.sleep(0)
            await runner.cleanup()
            await asyncio.sleep(0.01)  # closing a socket is a callback the loop runs next
            listener.close()


def serve(config: FakeConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C (or SIGTERM), printing one line saying where."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, host, port))


async def _serve(config: FakeConfig, host: str, port: int) -> None:
    runner = _runner(FakeState(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"fake DeepSeek-compatible server on http://{host}:{bound}", flush=True)  # noqa: T201 - the command's one line of output
        stopping = asyncio.Event()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        await stopping.wait()
    finally:
        await runner.cleanup()

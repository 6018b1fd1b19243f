"""A request cache: answers kept on disk, keyed by a hash of the exact request body.

A request answered before is served from the cache and costs nothing; identical requests in
one run are sent once (the others wait for the first). Only answers that came back ok (and,
for labelling jobs, parsed) are kept. One small JSON file per answer, written under a
temporary name and renamed, so a killed run never leaves a torn entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio
import orjson

from batchrun.client import Completion
from batchrun.errors import ConfigError
from batchrun.logs import scrub

_FIELDS = [f.name for f in dataclasses.fields(Completion) if f.name != "headers"]


def request_key(body: dict[str, Any], *, salt: str = "") -> str:
    """A stable hash of a request body (key order does not matter)."""
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    if salt:
        digest.update(salt.encode())
    return digest.hexdigest()


class RequestCache:
    """Answers on disk, plus the requests of this run still waiting for theirs."""

    def __init__(self, directory: Path) -> None:
        """Raises ConfigError: the folder cannot be made or written (a file is created and
        removed in it)."""
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=directory, prefix=".batchrun-probe-")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise ConfigError(
                f"the cache folder cannot be written ({exc.strerror}): choose another --cache "
                "or fix the folder's permissions",
                path=directory,
            ) from None
        self._pending: dict[str, anyio.Event] = {}

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        try:
            data = orjson.loads(self._path(key).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return Completion(**{name: data.get(name) for name in _FIELDS})

    def put(self, key: str, completion: Completion) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        # redacted: a server may echo the key inside an answer
        data = scrub({name: getattr(completion, name) for name in _FIELDS})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, path)

    async def claim(self, key: str) -> Completion | None:
        """The cached answer, or None after making this task the one that sends the request
        (then `release` must follow). Waits while another task of this run sends it."""
        while True:
            hit = self.get(key)
            if hit is not None:
                return hit
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = anyio.Event()
                return None
            await pending.wait()

    def release(self, key: str) -> None:
        """Wake the tasks waiting on `key` (they read the answer, or send it themselves)."""
        event = self._pending.pop(key, None)
        if event is not None:
            event.set()

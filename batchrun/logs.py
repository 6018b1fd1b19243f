"""structlog configuration and secret redaction.

Events go to stderr: readable on a terminal, JSON lines otherwise (or with `json=True`).
Every event passes through a processor that replaces registered secrets, so an API key that a
server echoes back in an error never reaches a log. While a live display is on the terminal,
retry events are left out of the terminal's log unless -v (`display_up`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, TextIO

REDACTED = "[redacted]"
_secrets: set[str] = set()
#: each secret as UTF-8 and as JSON text escapes it, to look for in encoded rows
_secret_bytes: set[bytes] = set()

#: events about one row's retries: on a terminal with the live display up they would scroll
#: above it (whose retries line counts them), so there they show only with -v; a log file
#: and a log that is not a terminal's get them all
RETRY_EVENTS = frozenset({"request_retried", "rate_limit_wait"})


class _Terminal:
    """What is on the terminal now."""

    #: live displays up (`display_up`)
    displays = 0


_terminal = _Terminal()


#: a key shorter than this (a local server's dummy "x" or "EMPTY") is not redacted: it would
#: cut ordinary words apart ("Model Not E[redacted]ist")
MIN_SECRET_LENGTH = 8


def register_secret(value: str | None) -> None:
    """Never log this value (short values are ignored: they would redact ordinary words)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        import json

        # as it is, as JSON text escapes it, and escaped again: a carried object is JSON text
        # (the secret escaped once in a field) inside a JSON line (escaped twice in the line)
        forms = [value]
        for _ in range(2):
            forms.append(json.dumps(forms[-1], ensure_ascii=False)[1:-1])
        _secrets.update(forms[:2])  # what a field's text may hold
        _secret_bytes.update(form.encode("utf-8", "surrogatepass") for form in forms)


def has_secrets() -> bool:
    """Whether any secret is registered (a cheap test before scrubbing a row)."""
    return bool(_secrets)


def secret_in(data: bytes) -> bool:
    """Whether a registered secret occurs in UTF-8 or JSON text: a search in C, where
    scrubbing a row looks at every field in Python."""
    return any(secret in data for secret in _secret_bytes)


def redact(text: str) -> str:
    """`text` with every registered secret replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub(value: Any) -> Any:
    """`value` with registered secrets replaced in every string, however deeply nested.

    What a run writes (journal, parts, output, metadata, cache) passes through this, so a key
    that a server echoes inside a 200 answer never reaches a file.
    """
    if not _secrets:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove registered secrets from every field."""
    if not _secrets:
        return event_dict
    return {key: scrub(value) for key, value in event_dict.items()}


@contextlib.contextmanager
def display_up() -> Iterator[None]:
    """Mark a live display as being on the terminal for the duration of the block."""
    _terminal.displays += 1
    try:
        yield
    finally:
        _terminal.displays -= 1


def drop_retries_under_display(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: drop a retry event while a live display is up (installed only
    when the log goes to the terminal at default verbosity)."""
    if _terminal.displays and event_dict.get("event") in RETRY_EVENTS:
        import structlog

        raise structlog.DropEvent
    return event_dict


class CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time, so that a live display that redirects
    stderr can print log lines above itself instead of through them."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


#: packages that structlog and httpx import when installed, for pretty tracebacks and
#: httpx's own command line, neither of which a run uses
_UNUSED_EXTRAS = ("rich", "pygments")


@contextlib.contextmanager
def without_rich() -> Iterator[None]:
    """Imports made in the block see rich and pygments as not installed (unless something
    imported them already): structlog and httpx then skip them, 75 modules and ~100 ms of
    every run's start-up. Both stay importable after the block (the live display uses rich)."""
    hidden = [name for name in _UNUSED_EXTRAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # what makes `import rich` fail
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


def configure(
    *,
    verbosity: int = 0,
    json: bool | None = None,
    stream: TextIO | None = None,
    log_file: str | None = None,
) -> None:
    """Set up logging for a CLI run. verbosity: -1 quiet, 0 normal, 1 debug.

    With `log_file`, events go to that file as JSON lines instead of to stderr.
    """
    # lazy import: structlog adds ~150 ms, and the redaction above is used where no log is
    with without_rich():
        import structlog

    out: Any = stream or CurrentStderr()
    if log_file is not None:
        # kept open for the rest of the process: log events may come until exit
        out = open(log_file, "a", encoding="utf-8", buffering=1)
        json = True
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    as_json = json if json is not None else not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        # plain tracebacks: format_exc_info has rendered them as text already
        else structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    # the terminal's log at default verbosity: retry lines would scroll above the display
    quiet = [drop_retries_under_display] if log_file is None and verbosity < 1 else []
    structlog.configure(
        processors=[
            *quiet,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # httpx logs every request at INFO: far too much for a batch of a million
    logging.getLogger("httpx").setLevel(logging.WARNING)

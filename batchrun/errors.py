"""The exception tree and the exit codes it maps to.

```
BatchrunError
├── ConfigError              a job file or flag is wrong            -> exit 2
├── InputError               a prompt set is wrong (file, line, row, column) -> exit 2
├── RunStopped               the run stopped early, resumable       -> exit 3
│   ├── AuthError            401/403: the key is wrong
│   │   └── KeyWanted        401/403 to a request sent without a key
│   ├── BalanceError         402: the account is out of credit
│   ├── CannotWrite          the checkpoint or output cannot be written mid-run
│   │   └── DiskFull         no space left there
│   ├── EndpointUnreachable  no connection (or no API) at the URL for too long
│   └── Interrupted          Ctrl-C or SIGTERM
└── RequestError             one request failed (a row's failure, never a run's)
    ├── RetryableError       429, 5xx, network faults, hidden failures in a 200
    │   ├── RateLimited      429, with the server's retry_after
    │   ├── ConnectFailed    no connection made (refused, DNS, connect timeout): nothing sent
    │   └── LeaseExpired     the attempt outlived its rate-limiter lease and was cut short
    └── PermanentError       400, 404, 422: the row is recorded as an error
        └── NotAnEndpoint    404 without an API error body: the URL is not an API
```

`ConnectFailed` and `NotAnEndpoint` are the endpoint's failures, not a row's: the pool pauses
every worker on them and stops with `EndpointUnreachable` when they last.

Only `cli.py` turns these into exit codes and one-line messages. Classes are chosen from status
codes and JSON fields, never from message text.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ROW_ERRORS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3


class BatchrunError(Exception):
    """Base of every error batchrun raises on purpose."""

    exit_code = EXIT_USAGE


class ConfigError(BatchrunError):
    """Raised when a job file or a flag is invalid."""

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(BatchrunError):
    """Raised when a prompt set cannot be used: the message names where."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | str,
        line: int | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.row = row
        self.column = column
        self.reason = message
        where = self.path
        if line is not None:
            where += f", line {line}"
        elif row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class RunStopped(BatchrunError):
    """Raised when a run stops before every row is done; running it again resumes."""

    exit_code = EXIT_STOPPED
    #: the run's RunSummary, attached when the run had started
    summary: Any = None


class AuthError(RunStopped):
    """Raised when the server rejects the API key (HTTP 401)."""

    def __init__(self, message: str = "") -> None:
        detail = f" ({message})" if message else ""
        super().__init__(
            f"the server rejected the API key{detail}: check the key variable and run again"
        )


class KeyWanted(AuthError):
    """Raised when a server refuses requests sent without a key (a loopback URL, no key set)."""

    def __init__(self, variable: str, message: str = "") -> None:
        self.variable = variable
        detail = f" ({message})" if message else ""
        RunStopped.__init__(
            self, f"the server wants a key: set {variable}{detail} and run the same command again"
        )


class BalanceError(RunStopped):
    """Raised when the account has no credit left (HTTP 402)."""

    def __init__(self, message: str = "") -> None:
        detail = f" ({message})" if message else ""
        super().__init__(f"insufficient balance{detail}: top up and run the same command again")


class CostCapReached(RunStopped):
    """Raised when the next request could take spend past the job's max_cost."""

    def __init__(self, *, spent: float, cap: float, next_worst: float | None = None) -> None:
        self.spent = spent
        self.cap = cap
        #: the most the request that did not fit could have cost
        self.next_worst = next_worst
        why = ""
        if next_worst is not None:
            why = (
                f", and the next request could cost up to ${next_worst:.4f} (its prompt and "
                "the longest answer it may get: max_tokens, else its model's most)"
            )
        super().__init__(
            f"spend cap reached: ${spent:.4f} spent of ${cap:.4f}{why}; run again with a "
            "higher --max-cost to go on"
        )


class CannotWrite(RunStopped):
    """Raised when the checkpoint or the output cannot be written mid-run (the folder turned
    read-only, its permissions changed): what is journalled is kept."""

    def __init__(self, path: Path | str, reason: str = "") -> None:
        self.path = str(path)
        super().__init__(self._message(reason))

    def _message(self, reason: str) -> str:
        detail = f" ({reason})" if reason else ""
        return f"cannot write at {self.path}{detail}: fix it and run the same command again"


class DiskFull(CannotWrite):
    """Raised when the disk holding the checkpoint or the output is full (ENOSPC, EDQUOT)."""

    def _message(self, reason: str) -> str:
        return (
            f"no space left on device at {self.path}: free some space and run the same "
            "command again to resume"
        )


#: errno values that mean "the disk is full" rather than "this path is wrong"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception is an OSError saying the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def cannot_write(path: Path | str, exc: OSError) -> CannotWrite:
    """The stop for a failed write at `path`: a full disk, or another reason."""
    if is_disk_full(exc):
        return DiskFull(path)
    return CannotWrite(path, exc.strerror or str(exc))


class EndpointUnreachable(RunStopped):
    """Raised when the endpoint cannot be reached (or is not an API) for too long."""

    def __init__(self, url: str, *, reason: str, since: str | None = None) -> None:
        self.url = url
        self.reason = reason
        self.since = since
        when = f" since {since}" if since else ""
        super().__init__(
            f"cannot connect to {url}{when} ({reason}): check base_url and the server, then "
            "run the same command again to resume"
        )


class Interrupted(RunStopped):
    """Raised when the user or the system asked the run to stop."""

    def __init__(self, signal_name: str = "interrupt") -> None:
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name}: run the same command again to resume")


class RequestError(BatchrunError):
    """Raised when one request fails; the row records it, the run goes on."""

    #: short class name written to the output's `error` column and used in logs
    error_class = "request"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class RetryableError(RequestError):
    """Raised when a request failed in a way that may pass on a later attempt."""

    def __init__(self, message: str, *, status: int | None = None, error_class: str) -> None:
        super().__init__(message, status=status)
        self.error_class = error_class


class RateLimited(RetryableError):
    """Raised on HTTP 429; `retry_after` is the server's requested delay in seconds, if any."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, status=429, error_class="rate_limit")
        self.retry_after = retry_after
        self.headers = headers


class ConnectFailed(RetryableError):
    """Raised when no connection could be made (refused, DNS failure, connect timeout): the
    request never left this machine, so nothing was sent or paid."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_class="connect")


class LeaseExpired(RetryableError):
    """Raised when an attempt outlived its rate-limiter lease and was cut short."""

    def __init__(self) -> None:
        super().__init__("the attempt outlived its rate-limit lease", error_class="timeout")


class PermanentError(RequestError):
    """Raised when the server refused the request itself (400, 404, 422): retrying won't help."""

    def __init__(self, message: str, *, status: int | None = None, error_class: str) -> None:
        super().__init__(message, status=status)
        self.error_class = error_class


class NotAnEndpoint(PermanentError):
    """Raised on a 404 whose body is no API error object: the URL is not a chat-completions
    endpoint (a wrong path), whatever the row holds."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404, error_class="not_found")

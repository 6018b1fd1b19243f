"""The endpoint's health, shared by every worker: while it is down, the whole pool waits.

A connection that cannot be made (refused, DNS failure, connect timeout) or a URL that answers
like no API at all (a 404 page) is the endpoint's failure, never a row's: it costs no attempt.
A connection reset mid-request may be one flaky connection (a normal retry, counted) or the
endpoint going away: a streak of them across rows, with no answer in between, is taken as an
outage. While the endpoint is down, one request at a time goes out as a probe (a row's own
request, so nothing extra is paid) and the others wait for it; a probe's answer of any kind,
a 429 or a 500 too, brings every worker back. An endpoint down longer
than `outage_timeout` (or than `start_timeout` when it never answered in this run) stops the
run with `EndpointUnreachable`, resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
import structlog

from batchrun.errors import (
    ConnectFailed,
    EndpointUnreachable,
    NotAnEndpoint,
    RetryableError,
)

log = structlog.get_logger("batchrun.outage")

#: resets in a row, from at least two rows and with no answer in between, that make an outage
RESET_STREAK = 3
#: the shortest wait for a verdict on a dropped connection: the refusals of new connections
#: that tell an outage take a few milliseconds to come, more on a loaded machine
VERDICT_MIN_WAIT = 0.25
#: the longest wait between two probes, whatever max_backoff says: a run should go on soon
#: after the endpoint comes back (tens of probes in a 15-minute outage, one at a time)
PROBE_MAX_DELAY = 10.0


class GateClosed(Exception):
    """Raised to a worker waiting at the gate when the run is stopping."""


@dataclass(frozen=True)
class GateStatistics:
    """A snapshot of the endpoint's health, for progress displays and tests."""

    #: local wall-clock time the endpoint went down, None while it is up
    down_since: datetime | None
    #: probes sent while it was down, over the run
    probes: int
    #: outages over the run
    outages: int

    @property
    def note(self) -> str | None:
        """`endpoint unreachable since 14:02, retrying`, while it is down."""
        if self.down_since is None:
            return None
        return f"endpoint unreachable since {self.down_since:%H:%M}, retrying"


class EndpointGate:
    """Whether the endpoint answers; workers pass it before each send.

    ```python
    probing = await gate.wait_turn()        # at once while `gate.open`; while down, a turn to probe
    sent_at = anyio.current_time()
    try:
        answer = await client.send(body)
    except ConnectFailed as exc:
        if await gate.failed(exc, row=position, probing=probing):
            ...                             # down: not the row's fault, go again at a turn
    else:
        gate.answered(probing=probing, sent_at=sent_at)
    ```
    """

    def __init__(
        self,
        url: str,
        *,
        outage_timeout: float,
        start_timeout: float,
        probe_delay: float = 1.0,
        max_probe_delay: float = PROBE_MAX_DELAY,
    ) -> None:
        self.url = url
        self.outage_timeout = outage_timeout
        self.start_timeout = start_timeout
        self.first_probe_delay = probe_delay
        self.max_probe_delay = max(probe_delay, min(max_probe_delay, PROBE_MAX_DELAY))
        self._ever_answered = False
        self._down_at = math.nan
        self._down_since: datetime | None = None
        self._reason = ""
        self._probing = False
        self._probe_delay = probe_delay
        self._streak = 0
        self._streak_rows: set[int] = set()
        #: when the last connection dropped, and the latest send time of an answered request
        self._failed_at = -math.inf
        self._answer_sent_at = -math.inf
        self._verdicts_wanted = 0
        self._changed = anyio.Event()
        self._closed = False
        self._probes = 0
        self._outages = 0

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def open(self) -> bool:
        """Up and not closed: `wait_turn` would return False at once (no probe turn)."""
        return self._down_since is None and not self._closed

    def statistics(self) -> GateStatistics:
        return GateStatistics(self._down_since, self._probes, self._outages)

    def close(self) -> None:
        """The run is stopping: wake every waiting worker with `GateClosed`."""
        self._closed = True
        self._notify()

    async def wait_turn(self) -> bool:
        """Return False at once while the endpoint is up; while it is down, wait until it
        answers again (False) or until it is this task's turn to probe (True).

        Raises:
            EndpointUnreachable: down for longer than the run may wait.
            GateClosed: the run is stopping.
        """
        while True:
            if self._closed:
                raise GateClosed
            if not self.down:
                return False
            self._check_deadline()
            if not self._probing:
                self._probing = True
                self._probes += 1
                return True
            changed = self._changed
            with anyio.move_on_after(self._time_left()):
                await changed.wait()

    def answered(self, *, probing: bool, sent_at: float) -> None:
        """An answer of any kind came back (a 429 or a 500 too) to a request sent at
        `sent_at` (`anyio.current_time()`): the endpoint is up.

        Only answers to requests sent after a failure say anything about it: a server going
        away still answers the requests it had, and drops the rest. While the endpoint is
        down, only a probe's answer brings it back.
        """
        self._ever_answered = True
        if probing:
            self._probing = False
        elif self.down:
            return
        if sent_at > self._failed_at:
            if self._streak:
                self._streak = 0
                self._streak_rows.clear()
            if sent_at > self._answer_sent_at:
                self._answer_sent_at = sent_at
            if self._verdicts_wanted:
                self._notify()
        if self.down:
            log.warning("endpoint_back", url=self.url, down_since=f"{self._down_since:%H:%M}")
            self._down_since = None
            self._down_at = math.nan
            self._probe_delay = self.first_probe_delay
            self._notify()

    def release(self, *, probing: bool) -> None:
        """The send ended some other way (cancelled, stopping): hand the probe turn on."""
        if probing:
            self._probing = False
            self._notify()

    async def failed(
        self,
        error: RetryableError | NotAnEndpoint,
        *,
        row: int,
        probing: bool,
        sent_at: float | None = None,
    ) -> bool:
        """Record a connection-level failure; returns whether the endpoint is down (the
        failure is then not the row's: it should go again at its turn, spending no attempt).

        A connection dropped mid-request while the endpoint is up waits up to a probe delay
        (about the backoff its retry would wait anyway) for a verdict: an answer to a request
        sent since makes it one flaky connection (False, a normal retry); the endpoint going
        down meanwhile makes it part of the outage. A failed probe waits its delay before
        the next one may go.

        Args:
            sent_at: when the failed request went (`anyio.current_time()`): an outage is
                counted from there, so a connect timeout's own wait counts towards it.

        Raises:
            EndpointUnreachable: a URL that never answered like an API, or down too long.
        """
        self._reason = str(error)
        if isinstance(error, NotAnEndpoint) and not self._ever_answered:
            raise EndpointUnreachable(self.url, reason=self._reason)  # a wrong path stays wrong
        if not isinstance(error, ConnectFailed | NotAnEndpoint) and not self.down:
            failed_at = anyio.current_time()
            self._failed_at = failed_at
            self._streak += 1
            self._streak_rows.add(row)
            if self._streak < RESET_STREAK or len(self._streak_rows) < 2:
                return not await self._flaky(failed_at)
        if not self.down:
            self._go_down(sent_at)
        if probing:
            log.info("endpoint_probe_failed", url=self.url, delay_s=self._probe_delay)
            try:
                with anyio.move_on_after(min(self._probe_delay, self._time_left())):
                    while self.down and not self._closed:
                        changed = self._changed
                        await changed.wait()
            finally:
                self._probe_delay = min(self._probe_delay * 2, self.max_probe_delay)
                self.release(probing=True)
        self._check_deadline()
        return True

    # -- inside ---------------------------------------------------------------------------

    async def _flaky(self, failed_at: float) -> bool:
        """Wait for a verdict on a dropped connection: True once a request sent after it is
        answered (or none is within a probe delay), False if the endpoint goes down."""
        self._verdicts_wanted += 1
        try:
            with anyio.move_on_after(max(self.first_probe_delay, VERDICT_MIN_WAIT)):
                while not self.down and not self._closed and self._answer_sent_at <= failed_at:
                    changed = self._changed
                    await changed.wait()
        finally:
            self._verdicts_wanted -= 1
        return not self.down

    def _go_down(self, sent_at: float | None) -> None:
        now = anyio.current_time()
        self._down_at = now if sent_at is None else min(now, sent_at)
        self._down_since = datetime.now().astimezone() - timedelta(seconds=now - self._down_at)
        self._outages += 1
        self._notify()
        log.warning(
            "endpoint_unreachable",
            url=self.url,
            since=f"{self._down_since:%H:%M}",
            note="retrying",
            reason=self._reason,
        )

    def _limit(self) -> float:
        return self.outage_timeout if self._ever_answered else self.start_timeout

    def _time_left(self) -> float:
        if not self.down:
            return math.inf
        return max(0.0, self._down_at + self._limit() - anyio.current_time())

    def _check_deadline(self) -> None:
        if self.down and self._time_left() <= 0:
            since = f"{self._down_since:%H:%M}" if self._ever_answered else None
            raise EndpointUnreachable(self.url, reason=self._reason, since=since)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

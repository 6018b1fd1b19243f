"""Runs a job: one task group, source -> bounded stream -> workers -> part files.

A row's failure is a value (an error row); a run's failure (bad key, no balance, interrupt)
is a stop: no new rows are taken, requests in flight may finish within a grace period, what
is done is written, and the stop is raised for the CLI to report.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from tenacity import RetryCallState

from batchrun import tokens
from batchrun.cache import RequestCache, request_key
from batchrun.client import Client, Completion
from batchrun.errors import (
    ConnectFailed,
    Interrupted,
    NotAnEndpoint,
    PermanentError,
    RateLimited,
    RequestError,
    RetryableError,
    RunStopped,
    cannot_write,
)
from batchrun.job import Job
from batchrun.limits import Limiter, Outcome, SpendCap
from batchrun.outage import EndpointGate, GateClosed
from batchrun.prices import Charge, PriceTable
from batchrun.progress import Tally, live_display, report_periodically
from batchrun.prompts import RequestShape, build_request, expand_sweep
from batchrun.retry import RetryPolicy
from batchrun.sinks import INDEX_COLUMN, PAID_BEFORE_COLUMN, PartWriter
from batchrun.sources import InputRow, InputSummary, iter_batches
from batchrun.structured import ParseFailed, parse_fields

log = structlog.get_logger("batchrun")

FLUSH_ROWS = 500
FLUSH_SECONDS = 5.0
#: how long requests in flight may take to finish after a stop
STOP_GRACE_SECONDS = 30.0


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else a + b)


def _summed(answers: list[Completion]) -> Completion:
    """The last answer, with the usage of every answer the row paid for."""
    last = answers[-1]
    total = dataclasses.replace(last)
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_cache_hit_tokens",
        "prompt_cache_miss_tokens",
        "reasoning_tokens",
    ):
        value: int | None = None
        for answer in answers:
            value = _add(value, getattr(answer, name))
        setattr(total, name, value)
    return total


@dataclass(slots=True)
class Work:
    """One request to make: an input row in one sweep variant, at its output position."""

    row: InputRow
    variant: int
    position: int


@dataclass(slots=True)
class _Asks:
    """A row's progress through its requests (attempts and parse re-asks): what was sent,
    what it cost, and how much of that cost is already journaled."""

    #: `time.perf_counter()` when a worker took the row
    taken: float
    answers: list[Completion] = field(default_factory=list)
    #: requests actually sent
    attempts: int = 0
    #: USD of every answer paid for; None while no answer has a known price
    cost: float | None = None
    #: some answer came without usage and is counted at its worst case
    worst_case: bool = False
    #: the part of `cost` already journaled in rows written before this row's last one
    journaled: float = 0.0
    #: `time.perf_counter()` when the first request left, and its wall-clock time
    first_sent: float | None = None
    started_at: datetime | None = None
    #: seconds spent waiting on the server, summed over every request sent
    in_requests: float = 0.0

    def sending(self, at: datetime) -> float:
        """Note that a request is leaving now; returns its `perf_counter` start."""
        now = time.perf_counter()
        self.attempts += 1
        if self.first_sent is None:
            self.first_sent, self.started_at = now, at
        return now

    def charge(self, charge: Charge) -> None:
        if charge.usd is not None:
            self.cost = charge.usd if self.cost is None else self.cost + charge.usd
        self.worst_case = self.worst_case or charge.worst_case


class _Abandoned(Exception):
    """Raised inside a row's retry loop when the run is stopping: the row is not recorded."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class PoolSettings:
    """Knobs of the pool that are not part of the job (tests shorten them)."""

    flush_rows: int = FLUSH_ROWS
    flush_seconds: float = FLUSH_SECONDS
    stop_grace: float = STOP_GRACE_SECONDS
    #: "live" (a rich display on the terminal), "lines" (a log line every few seconds), or None
    display: str | None = None
    progress_every: float = 5.0
    #: turn Ctrl-C and SIGTERM into a graceful stop (only possible in the main thread)
    handle_signals: bool = False


@dataclass
class Pool:
    """The moving parts of one run, shared by its tasks."""

    job: Job
    scan: InputSummary
    client: Client
    limiter: Limiter
    prices: PriceTable
    spend: SpendCap
    writer: PartWriter
    tally: Tally
    cache: RequestCache | None = None
    #: a byte per position, set where a row is already done ok (from the checkpoint)
    skip: bytearray | None = None
    settings: PoolSettings = field(default_factory=PoolSettings)
    stop_reason: RunStopped | None = None
    _stop_event: anyio.Event = field(default_factory=anyio.Event)
    _flush_wanted: anyio.Event = field(default_factory=anyio.Event)
    _flush_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def __post_init__(self) -> None:
        self.variants = expand_sweep(self.job.sweep)
        self.shapes = [RequestShape.from_job(self.job, v.settings) for v in self.variants]
        self.variant_columns = [v.columns() for v in self.variants] if self.job.sweep else None
        self.carry = tuple(self.job.prompt.carry)
        self.parse = self.job.parse
        # one byte a position: the resume check per row is an index, not a search
        self._done: bytearray | None = self.skip
        limits = self.job.limits
        self.gate = EndpointGate(
            self.client.url,
            outage_timeout=limits.outage_timeout,
            start_timeout=limits.start_timeout,
            probe_delay=limits.initial_backoff,
            max_probe_delay=limits.max_backoff,
        )

    # -- stopping -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: RunStopped) -> None:
        """Stop taking rows; the first reason given is the one reported."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning("run_stopping", reason=str(reason))
            self._stop_event.set()
            self.gate.close()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop_event.wait()

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Send every row not yet done; returns when all are done or the run stops."""
        limit = self.job.limits.concurrency
        send, receive = anyio.create_memory_object_stream[Work](limit * 2)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._flush_periodically)
                if self.settings.display == "live":
                    outer.start_soon(live_display, self.tally, self.limiter, self.gate)
                elif self.settings.display == "lines":
                    outer.start_soon(
                        report_periodically,
                        self.tally,
                        self.settings.progress_every,
                        self.limiter,
                        self.gate,
                    )
                async with anyio.create_task_group() as group:
                    outer.start_soon(self._cancel_after_grace, group.cancel_scope)
                    if self.settings.handle_signals:
                        outer.start_soon(self._watch_signals, group.cancel_scope)
                    group.start_soon(self._produce, send)
                    for _ in range(limit):
                        group.start_soon(self._work, receive.clone())
                    receive.close()
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()

    async def _cancel_after_grace(self, scope: anyio.CancelScope) -> None:
        """After a stop, requests in flight get a grace period, then are cancelled.

        Workers waiting out a 429 pause or a budget have nothing in flight: once no request
        is, the rest are cancelled at once rather than after the grace period.
        """
        await self._stop_event.wait()
        with anyio.move_on_after(self.settings.stop_grace):
            # polled: in_flight is a plain counter of the tally, and this runs once a run
            while self.tally.in_flight > 0:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        scope.cancel()

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        """First Ctrl-C or SIGTERM: stop gracefully. A second one: cancel in-flight requests."""
        # asyncio resets a signal to its default (for SIGTERM: kill) when the receiver closes;
        # the caller's handlers go back at once, so no signal finds the process unguarded
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if self.stopping:
                        log.warning("run_cancelling", signal=signal.Signals(signum).name)
                        scope.cancel()
                        return
                    self.stop(Interrupted(signal.Signals(signum).name))
        finally:
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)

    async def _produce(self, send: MemoryObjectSendStream[Work]) -> None:
        async with send:
            batches = iter_batches(self.job.input, limit=self.job.limit, skip=self._all_done)
            while not self.stopping:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    break
                for work in self._not_done(batch):
                    if self.stopping:
                        break
                    await send.send(work)

    def _all_done(self, start: int, end: int) -> bool:
        """Whether input rows [start, end) are done in every variant (read from a thread)."""
        done = self._done
        if done is None:
            return False
        count = len(self.variants)
        first, last = start * count, end * count
        return last <= len(done) and done.count(0, first, last) == 0

    def _not_done(self, batch: list[InputRow]) -> Iterator[Work]:
        """Each row once per sweep variant, at its own position, unless already done."""
        count = len(self.variants)
        done = self._done
        for row in batch:
            for variant in range(count):
                position = row.index * count + variant
                if done is None or position >= len(done) or not done[position]:
                    yield Work(row, variant, position)

    async def _work(self, receive: MemoryObjectReceiveStream[Work]) -> None:
        async with receive:
            current: list[str] = [""]

            def before_sleep(state: RetryCallState) -> None:
                error = state.outcome.exception() if state.outcome else None
                error_class = getattr(error, "error_class", "unknown")
                self.tally.retries_by_class[error_class] += 1
                log.info(
                    "request_retried",
                    row_id=current[0],
                    attempt=state.attempt_number,
                    error_class=error_class,
                    http_status=getattr(error, "status", None),
                    delay_s=round(state.upcoming_sleep, 3),
                )

            policy = RetryPolicy(
                self.job.limits, before_sleep=before_sleep, sleep=self._sleep_unless_stopping
            )
            async for work in receive:
                if self.stopping:
                    continue
                current[0] = self.scan.ids.text(work.row, self.job.input)
                try:
                    result = await self._process(work, current[0], policy)
                except (_Abandoned, RunStopped) as stop:
                    if isinstance(stop, RunStopped):
                        self.stop(stop)
                    partial = getattr(stop, "partial_result", None)
                    if partial is None:
                        continue
                    result = partial  # paid answers of a row cut short: written, not lost
                self._keep(result)

    def _keep(self, result: dict[str, Any]) -> None:
        """Hand a finished row to the writer (its journal has it at once) and count it."""
        try:
            self.writer.add(result)
        except OSError as exc:  # a full disk, a folder turned read-only: what is journalled stays
            self.stop(cannot_write(self.writer.directory, exc))
            return
        self.tally.record_row(result)
        if len(self.writer) >= self.settings.flush_rows:
            self._flush_wanted.set()

    async def _process(self, work: Work, rid: str, policy: RetryPolicy) -> dict[str, Any]:
        row = work.row
        asks = _Asks(taken=time.perf_counter())
        body = build_request(row.data, self.shapes[work.variant])
        prompt_estimate = tokens.prompt_tokens(body)
        prompt_at_most = tokens.prompt_tokens_at_most(body)
        cap = tokens.completion_cap(body)
        model = str(body.get("model"))
        completion: Completion | None = None
        failure: RequestError | None = None
        spend = self.spend
        worst = 0.0
        if spend.cap is not None:
            worst = self.prices.worst_case(
                model, _now(), prompt_tokens=prompt_at_most, completion_cap=cap
            )

        async def attempt() -> Completion:
            if self.stopping:
                raise _Abandoned
            await spend.reserve(worst)
            try:
                reservation = await self.limiter.reserve(
                    prompt_tokens=prompt_estimate, completion_cap=cap
                )
            except BaseException:
                spend.settle(worst, None)
                raise
            outcome = Outcome.OTHER
            answer: Completion | None = None
            failure: RetryableError | None = None
            sent: float | None = None
            sent_at = _now()
            try:
                if self.stopping:  # stopped while waiting for the budget: nothing is sent
                    raise _Abandoned
                sent = asks.sending(sent_at)
                self.tally.requests += 1
                self.tally.in_flight += 1
                answer = await self._send(body, work.position)
                outcome = Outcome.OK
                return answer
            except RetryableError as exc:
                failure = exc
                if isinstance(exc, RateLimited):
                    outcome = Outcome.RATE_LIMITED
                elif exc.error_class in ("server", "server_busy"):
                    outcome = Outcome.SERVER_ERROR
                raise
            finally:
                if sent is not None:
                    self.tally.in_flight -= 1
                    asks.in_requests += time.perf_counter() - sent
                if answer is not None:
                    charge = self.prices.charge(
                        model if answer.model is None or self.prices.knows(model) else answer.model,
                        sent_at,
                        prompt_tokens=answer.prompt_tokens,
                        cache_hit_tokens=answer.prompt_cache_hit_tokens,
                        cache_miss_tokens=answer.prompt_cache_miss_tokens,
                        completion_tokens=answer.completion_tokens,
                        prompt_at_most=prompt_at_most,
                        completion_cap=cap,
                    )
                    asks.charge(charge)
                    spend.settle(worst, charge.usd)
                else:
                    spend.settle(worst, None)
                if sent is None:  # stopped before sending: the budget it took goes back
                    self.limiter.cancel(reservation)
                else:
                    self.limiter.settle(
                        reservation,
                        outcome=outcome,
                        prompt_tokens=answer.prompt_tokens if answer else None,
                        completion_tokens=answer.completion_tokens if answer else None,
                        retry_after=failure.retry_after
                        if isinstance(failure, RateLimited)
                        else None,
                        headers=answer.headers
                        if answer
                        else (failure.headers if isinstance(failure, RateLimited) else None),
                    )

        cache, key, cached = self.cache, "", False
        if cache is not None:
            variant = self.variants[work.variant]
            # repeats of one combination are meant to be sampled again, not served twice
            salt = f"repeat {variant.repeat}" if variant.repeats > 1 else ""
            key = request_key(body, salt=salt)
            completion = await cache.claim(key)
            cached = completion is not None
        parsed: dict[str, Any] | None = None
        answers = asks.answers
        try:
            if completion is None:
                asks_left = 1 + (self.parse.parse_attempts if self.parse else 0)
                while asks_left:
                    asks_left -= 1
                    try:
                        completion = await policy.call(attempt)
                    except RequestError as exc:
                        failure = exc
                        break
                    except (_Abandoned, RunStopped) as stop:
                        if answers:  # a paid answer that did not parse: keep it, then stop
                            stop.partial_result = self._cut_short(work, rid, asks)  # type: ignore[union-attr]
                        raise
                    except anyio.get_cancelled_exc_class():
                        if answers:  # cancelled outright: write the paid answers before going
                            self._keep(self._cut_short(work, rid, asks))
                        raise
                    answers.append(completion)
                    parsed, failure = self._parsed(completion)
                    if failure is None:
                        break
                    if asks_left:  # re-asked next: what is paid so far is journaled now
                        self._journal_paid(work, rid, asks, failure)
            else:
                parsed, failure = self._parsed(completion)
            if cache is not None and not cached and completion is not None and failure is None:
                cache.put(key, completion)
        finally:
            if cache is not None and not cached:
                cache.release(key)
        if not answers and completion is not None:
            answers.append(completion)
        return self._finish(work, rid, asks, failure, parsed, cached=cached)

    def _journal_paid(self, work: Work, rid: str, asks: _Asks, failure: RequestError) -> None:
        """Journal the paid answers of a row about to be re-asked, so that a kill before the
        next answer loses neither them nor their cost. The row is not counted as done: its
        later row for the same position supersedes it."""
        result = self._finish(work, rid, asks, failure, None, cached=False)
        self.writer.add(result)
        asks.journaled = result["cost_usd"] or 0.0

    async def _send(self, body: dict[str, Any], position: int) -> Completion:
        """`client.send` through the endpoint gate: while the endpoint is down, a failure to
        reach it is not the row's, so the request waits its turn and goes again within the
        same attempt."""
        gate = self.gate
        while True:
            try:
                probing = await gate.wait_turn()
            except GateClosed:
                raise _Abandoned from None
            failure: RetryableError | NotAnEndpoint
            sent_at = anyio.current_time()
            try:
                answer = await self.client.send(body)
            except (ConnectFailed, NotAnEndpoint) as exc:
                failure = exc
            except RetryableError as exc:
                if exc.error_class != "network":
                    gate.answered(probing=probing, sent_at=sent_at)
                    raise
                failure = exc
            except (RequestError, RunStopped):
                gate.answered(probing=probing, sent_at=sent_at)
                raise
            except BaseException:
                gate.release(probing=probing)
                raise
            else:
                gate.answered(probing=probing, sent_at=sent_at)
                return answer
            if not await gate.failed(failure, row=position, probing=probing, sent_at=sent_at):
                raise failure  # one flaky connection: a normal retry
            if self.stopping:
                raise _Abandoned

    def _cut_short(self, work: Work, rid: str, asks: _Asks) -> dict[str, Any]:
        """The row of paid answers that never parsed, when the run stops before a re-ask."""
        failure = PermanentError("the run stopped before an answer parsed", error_class="parse")
        return self._finish(work, rid, asks, failure, None, cached=False)

    def _finish(
        self,
        work: Work,
        rid: str,
        asks: _Asks,
        failure: RequestError | None,
        parsed: dict[str, Any] | None,
        *,
        cached: bool,
    ) -> dict[str, Any]:
        """The result row: the last answer, with the usage of every answer paid for."""
        answers = asks.answers
        completion = _summed(answers) if len(answers) > 1 else (answers[0] if answers else None)
        result = self._result(work.row, rid, completion, failure, asks)
        result[INDEX_COLUMN] = work.position
        if self.variant_columns is not None:
            result.update(self.variant_columns[work.variant])
        if self.parse is not None:
            for name in self.parse.fields:
                result[name] = parsed.get(name) if parsed else None
        result["cost_usd"] = 0.0 if cached else asks.cost
        result["cost_worst_case"] = False if cached else asks.worst_case
        result["cached"] = cached
        result[PAID_BEFORE_COLUMN] = asks.journaled
        return result

    def _parsed(self, completion: Completion) -> tuple[dict[str, Any] | None, RequestError | None]:
        """The parsed fields of an answer, or the parse failure to record."""
        if self.parse is None:
            return None, None
        try:
            return parse_fields(completion.content, self.parse.fields), None
        except ParseFailed as exc:
            return None, PermanentError(
                f"the answer does not parse: {exc}",
                status=completion.http_status,
                error_class="parse",
            )

    def _result(
        self,
        row: InputRow,
        rid: str,
        completion: Completion | None,
        failure: RequestError | None,
        asks: _Asks,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {INDEX_COLUMN: row.index}
        for name in self.carry:
            result[name] = row.data.get(name)
        result["id"] = self.scan.ids.output_value(row, self.job.input)  # the user's, typed
        c = completion
        sent = asks.first_sent is not None
        result.update(
            status="ok" if c is not None and failure is None else "error",
            content=c.content if c else None,
            reasoning_content=c.reasoning_content if c else None,
            finish_reason=c.finish_reason if c else None,
            model=c.model if c else None,
            prompt_tokens=c.prompt_tokens if c else None,
            completion_tokens=c.completion_tokens if c else None,
            total_tokens=c.total_tokens if c else None,
            prompt_cache_hit_tokens=c.prompt_cache_hit_tokens if c else None,
            prompt_cache_miss_tokens=c.prompt_cache_miss_tokens if c else None,
            reasoning_tokens=c.reasoning_tokens if c else None,
            attempts=asks.attempts,
            latency_s=asks.in_requests if sent else None,
            queued_s=asks.first_sent - asks.taken if asks.first_sent is not None else None,
            http_status=c.http_status if c else (failure.status if failure else None),
            error=failure.message if failure else None,
            error_class=failure.error_class if failure else None,
            response_id=c.response_id if c else None,
            started_at=asks.started_at or _now(),
            finished_at=_now(),
        )
        return result

    # -- writing ----------------------------------------------------------------------------

    async def _flush_periodically(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.flush_seconds):
                await self._flush_wanted.wait()
            self._flush_wanted = anyio.Event()
            with anyio.CancelScope(shield=True):  # rows taken for a part are always written
                await self.flush()

    async def flush(self) -> None:
        """Write buffered results to a new part file."""
        async with self._flush_lock:
            taken = self.writer.take()
            if taken is None:
                return
            path, rows = taken
            try:
                await anyio.to_thread.run_sync(self.writer.write_part, path, rows)
            except OSError as exc:
                # the rows stay in their journal segment: the next run makes the part
                self.stop(cannot_write(self.writer.directory, exc))
                return
            log.debug("checkpoint_flushed", part=path.name, rows=len(rows))

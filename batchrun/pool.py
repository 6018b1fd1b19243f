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
)
from batchrun.job import Job
from batchrun.limits import Limiter, Outcome, SpendCap
from batchrun.outage import EndpointGate, GateClosed
from batchrun.prices import PriceTable
from batchrun.progress import Tally, live_display, report_periodically
from batchrun.prompts import RequestShape, build_request, expand_sweep
from batchrun.retry import RetryPolicy
from batchrun.sinks import INDEX_COLUMN, PartWriter
from batchrun.sources import InputRow, InputSummary, iter_batches, row_id
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
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stopping:
                    log.warning("run_cancelling", signal=signal.Signals(signum).name)
                    scope.cancel()
                    return
                self.stop(Interrupted(signal.Signals(signum).name))

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
                current[0] = row_id(work.row, self.job.prompt.id_column, self.job.input)
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
        self.writer.add(result)
        self.tally.record_row(result)
        if len(self.writer) >= self.settings.flush_rows:
            self._flush_wanted.set()

    async def _process(self, work: Work, rid: str, policy: RetryPolicy) -> dict[str, Any]:
        row = work.row
        body = build_request(row.data, self.shapes[work.variant])
        prompt_estimate = tokens.prompt_tokens(body)
        cap = tokens.completion_cap(body)
        model = str(body.get("model"))
        started_at = _now()
        t0 = time.perf_counter()
        attempts = 0
        completion: Completion | None = None
        failure: RequestError | None = None
        cost: float | None = None
        spend = self.spend
        worst = 0.0
        if spend.cap is not None:
            worst = self.prices.worst_case(
                model,
                started_at,
                prompt_tokens=tokens.prompt_tokens_at_most(body),
                completion_cap=cap,
            )

        async def attempt() -> Completion:
            nonlocal attempts, cost
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
            attempts += 1
            self.tally.requests += 1
            self.tally.in_flight += 1
            outcome = Outcome.OTHER
            answer: Completion | None = None
            failure: RetryableError | None = None
            try:
                if self.stopping:
                    raise _Abandoned
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
                self.tally.in_flight -= 1
                if answer is not None:
                    answer_cost = self.prices.cost(
                        model if answer.model is None or self.prices.knows(model) else answer.model,
                        started_at,
                        prompt_tokens=answer.prompt_tokens,
                        cache_hit_tokens=answer.prompt_cache_hit_tokens,
                        cache_miss_tokens=answer.prompt_cache_miss_tokens,
                        completion_tokens=answer.completion_tokens,
                    )
                    if answer_cost is not None:
                        cost = answer_cost if cost is None else cost + answer_cost
                    spend.settle(worst, answer_cost)
                else:
                    spend.settle(worst, None)
                self.limiter.settle(
                    reservation,
                    outcome=outcome,
                    prompt_tokens=answer.prompt_tokens if answer else None,
                    completion_tokens=answer.completion_tokens if answer else None,
                    retry_after=failure.retry_after if isinstance(failure, RateLimited) else None,
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
        answers: list[Completion] = []
        try:
            if completion is None:
                asks = 1 + (self.parse.parse_attempts if self.parse else 0)
                for _ in range(asks):
                    try:
                        completion = await policy.call(attempt)
                    except RequestError as exc:
                        failure = exc
                        break
                    except (_Abandoned, RunStopped) as stop:
                        if answers:  # a paid answer that did not parse: keep it, then stop
                            stop.partial_result = self._cut_short(  # type: ignore[union-attr]
                                work, rid, answers, attempts, t0, started_at, cost
                            )
                        raise
                    except anyio.get_cancelled_exc_class():
                        if answers:  # cancelled outright: write the paid answers before going
                            self._keep(
                                self._cut_short(work, rid, answers, attempts, t0, started_at, cost)
                            )
                        raise
                    answers.append(completion)
                    parsed, failure = self._parsed(completion)
                    if failure is None:
                        break
            else:
                parsed, failure = self._parsed(completion)
            if cache is not None and not cached and completion is not None and failure is None:
                cache.put(key, completion)
        finally:
            if cache is not None and not cached:
                cache.release(key)
        return self._finish(
            work,
            rid,
            answers or [completion] if completion else [],
            failure,
            parsed,
            attempts,
            t0,
            started_at,
            cost,
            cached=cached,
        )

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

    def _cut_short(
        self,
        work: Work,
        rid: str,
        answers: list[Completion],
        attempts: int,
        t0: float,
        started_at: datetime,
        cost: float | None,
    ) -> dict[str, Any]:
        """The row of paid answers that never parsed, when the run stops before a re-ask."""
        failure = PermanentError("the run stopped before an answer parsed", error_class="parse")
        return self._finish(
            work, rid, answers, failure, None, attempts, t0, started_at, cost, cached=False
        )

    def _finish(
        self,
        work: Work,
        rid: str,
        answers: list[Completion],
        failure: RequestError | None,
        parsed: dict[str, Any] | None,
        attempts: int,
        t0: float,
        started_at: datetime,
        cost: float | None,
        *,
        cached: bool,
    ) -> dict[str, Any]:
        """The result row: the last answer, with the usage of every answer paid for."""
        latency = time.perf_counter() - t0
        completion = _summed(answers) if len(answers) > 1 else (answers[0] if answers else None)
        result = self._result(work.row, rid, completion, failure, attempts, latency, started_at)
        result[INDEX_COLUMN] = work.position
        if self.variant_columns is not None:
            result.update(self.variant_columns[work.variant])
        if self.parse is not None:
            for name in self.parse.fields:
                result[name] = parsed.get(name) if parsed else None
        result["cost_usd"] = 0.0 if cached else cost
        result["cached"] = cached
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
        attempts: int,
        latency: float,
        started_at: datetime,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {"id": rid, INDEX_COLUMN: row.index}
        for name in self.carry:
            result[name] = row.data.get(name)
        c = completion
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
            attempts=attempts,
            latency_s=latency,
            http_status=c.http_status if c else (failure.status if failure else None),
            error=failure.message if failure else None,
            error_class=failure.error_class if failure else None,
            response_id=c.response_id if c else None,
            started_at=started_at,
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
            await anyio.to_thread.run_sync(self.writer.write_part, path, rows)
            log.debug("checkpoint_flushed", part=path.name, rows=len(rows))

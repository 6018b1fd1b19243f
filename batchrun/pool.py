"""Runs a job: one task group, source -> bounded stream -> workers -> part files.

Workers hand each work item to `rows.RowMaker` and keep the row it returns; every request
goes through the endpoint gate (`outage`) and is metered by `meter.AttemptMeter` against the
`RateLimiter` the pool is given (`ratelimit`), the spend cap and the prices.

A row's failure is a value (an error row); a run's failure (bad key, no balance, interrupt)
is a stop: no new rows are taken, requests in flight may finish within a grace period, what
is done is written, and the stop is raised for the CLI to report.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchrun.cache import RequestCache
from batchrun.client import Client, Completion
from batchrun.clock import SYSTEM_CLOCK, Clock
from batchrun.errors import (
    ConnectFailed,
    Interrupted,
    NotAnEndpoint,
    RequestError,
    RetryableError,
    RunStopped,
    cannot_write,
)
from batchrun.job import Job
from batchrun.limits import SpendBudget
from batchrun.meter import Attempt, AttemptMeter
from batchrun.outage import EndpointGate, GateClosed
from batchrun.prices import PriceTable
from batchrun.progress import Tally, live_display, report_periodically
from batchrun.prompts import expand_sweep
from batchrun.ratelimit import RateLimiter
from batchrun.retry import RetryPolicy
from batchrun.rows import Abandoned, RowMaker, Work
from batchrun.schedule import OFF_PEAK, OffPeakSchedule
from batchrun.sinks import PartWriter
from batchrun.sources import InputRow, InputSummary, RowStart, iter_batches

if TYPE_CHECKING:  # tenacity loads with a run's first retry (retry.py)
    from tenacity import RetryCallState

log = structlog.get_logger("batchrun")

#: a part file is written every FLUSH_ROWS rows, FLUSH_BYTES of journal or FLUSH_SECONDS,
#: whichever comes first. Those rows are held in memory meanwhile (a few KB each) and a
#: killed run folds at most that much journal into a part when it resumes; a part file costs
#: ~2 ms of CPU and an fsync of its own, so 5,000-row parts cost ~4 µs a row less than
#: 500-row ones, and compaction reads a tenth as many files
FLUSH_ROWS = 5000
FLUSH_BYTES = 16 << 20
FLUSH_SECONDS = 5.0
#: how often the pool looks whether the limiter's concurrency has grown past its workers
GROW_EVERY_SECONDS = 0.02
#: how long requests in flight may take to finish after a stop
STOP_GRACE_SECONDS = 30.0


@dataclass(slots=True)
class _RetryLog:
    """Counts and logs a worker's retries, naming the row it is on."""

    tally: Tally
    #: a row's id as text, worked out only when a retry is logged
    row_id: Callable[[Work], str]
    #: the work item the worker is on
    work: Work | None = None

    def before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        error_class = getattr(error, "error_class", "unknown")
        self.tally.retries_by_class[error_class] += 1
        log.info(
            "request_retried",
            row_id=self.row_id(self.work) if self.work is not None else None,
            attempt=state.attempt_number,
            error_class=error_class,
            http_status=getattr(error, "status", None),
            delay_s=round(state.upcoming_sleep, 3),
        )


def next_turn_yield() -> Callable[[], Awaitable[None]]:
    """How the running task lets the other ready tasks run once: on asyncio, its bare yield
    (`asyncio.sleep(0)`); elsewhere anyio's checkpoint, which looks up the backend at every
    call (half its cost, and the pool yields once a row)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio)
        return anyio.lowlevel.checkpoint
    return partial(asyncio.sleep, 0)


def backend_options() -> dict[str, Any]:
    """anyio's asyncio options for a run: uvloop where it is installed (not on Windows), whose
    event loop and sockets cost about a third less CPU per request than asyncio's own."""
    import importlib.util

    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


@dataclass
class PoolSettings:
    """Knobs of the pool that are not part of the job (tests shorten them)."""

    flush_rows: int = FLUSH_ROWS
    flush_bytes: int = FLUSH_BYTES
    flush_seconds: float = FLUSH_SECONDS
    stop_grace: float = STOP_GRACE_SECONDS
    #: "live" (a rich display on the terminal), "lines" (a log line every few seconds), or None
    display: str | None = None
    progress_every: float = 5.0
    #: turn Ctrl-C and SIGTERM into a graceful stop (only possible in the main thread)
    handle_signals: bool = False
    #: -v: let engines show their own start-up output (Ray's)
    verbose: bool = False
    #: the wall clock: when requests are sent (their price) and when off-peak begins
    clock: Clock = SYSTEM_CLOCK


@dataclass
class Pool:
    """The moving parts of one run, shared by its tasks."""

    job: Job
    scan: InputSummary
    client: Client
    #: the rate limiter (`ratelimit.LocalRateLimiter`, or any other `RateLimiter`)
    limiter: RateLimiter
    prices: PriceTable
    #: the spend cap (`limits.SpendCap`, or a cluster-wide `SpendBudget`)
    spend: SpendBudget
    writer: PartWriter
    tally: Tally
    cache: RequestCache | None = None
    #: the digest of the API key (`ratelimit.key_digest`), naming the account in scopes
    key_digest: str = ""
    #: a byte per position, set where a row is already done ok (from the checkpoint)
    skip: bytearray | None = None
    settings: PoolSettings = field(default_factory=PoolSettings)
    #: where to begin reading the input (a shard's first row), if not at its start
    start: RowStart | None = None
    stop_reason: RunStopped | None = None
    _stop_event: anyio.Event = field(default_factory=anyio.Event)
    _flush_wanted: anyio.Event = field(default_factory=anyio.Event)
    _flush_lock: anyio.Lock = field(default_factory=anyio.Lock)
    #: lets the other ready tasks run once (`next_turn_yield`, set when the run starts)
    _next_turn: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint

    def __post_init__(self) -> None:
        self.variants = expand_sweep(self.job.sweep)
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
        self.meter = AttemptMeter(
            limiter=self.limiter,
            spend=self.spend,
            prices=self.prices,
            endpoint=self.client.url,
            key_digest=self.key_digest,
            clock=self.settings.clock,
            schedule=(
                OffPeakSchedule(
                    self.prices, clock=self.settings.clock, stop=self._stop_event, tally=self.tally
                )
                if self.job.schedule == OFF_PEAK
                else None
            ),
        )
        self.rows = RowMaker(
            job=self.job,
            scan=self.scan,
            meter=self.meter,
            tally=self.tally,
            send=self._send,  # it puts its waits under `attempt.deadline()`
            journal=self.writer.add,
            keep=self.writer.queue,
            stopping=lambda: self.stopping,
            sleep=self._sleep_unless_stopping,
            variants=self.variants,
            cache=self.cache,
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
        self._next_turn = next_turn_yield()
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
                    group.start_soon(self._start_workers, group, receive)
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush(in_thread=False)

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
            batches = iter_batches(
                self.job.input, limit=self.job.limit, skip=self._all_done, start=self.start
            )
            while not self.stopping:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    break
                for work in self._not_done(batch):
                    if self.stopping:
                        break
                    # the row is ready from here: its `queued_s` counts the wait for a worker
                    work.queued_at = perf_counter()
                    try:  # a stream with room takes the item without a trip through the loop
                        send.send_nowait(work)
                    except anyio.WouldBlock:
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

    async def _start_workers(
        self, group: TaskGroup, receive: MemoryObjectReceiveStream[Work]
    ) -> None:
        """Start workers as the limiter lets more requests go at once, up to the job's
        `concurrency`, and return once that many run or no work is left.

        A worker beyond the limiter's concurrency only waits in its queue, holding a row:
        with DeepSeek's 2,500-slot ceiling and an adaptive concurrency that starts at 8, a
        task a slot from the start cost 22% more CPU on a 3,000-row run at 0.5 s answers.
        The limiter's concurrency and an eighth more (and 8) keeps every slot used while
        workers journal their rows, and someone waiting, so that the limiter sees itself
        saturated and grows; the pool follows within `GROW_EVERY_SECONDS`. A fixed
        concurrency starts every worker at once, and so does a limiter that reports a
        concurrency of 0 or less (`RateLimiter.statistics`: it does not know one).
        """
        ceiling, started = self.job.limits.concurrency, 0
        with receive:
            while True:
                allowed = self.limiter.statistics().concurrency
                # a limiter that reports none (<= 0) says nothing of it: start the ceiling
                wanted = ceiling if allowed <= 0 else min(ceiling, allowed + allowed // 8 + 8)
                while started < wanted:
                    group.start_soon(self._work, receive.clone())
                    started += 1
                self.tally.workers = started
                stream = receive.statistics()
                if (
                    started >= ceiling
                    or self.stopping
                    or (stream.open_send_streams == 0 and stream.current_buffer_used == 0)
                ):
                    return
                await anyio.sleep(GROW_EVERY_SECONDS)

    async def _work(self, receive: MemoryObjectReceiveStream[Work]) -> None:
        """Make rows until the stream ends, journalling each finished row with the rows of
        the other workers that finish in the same turn of the event loop (one write for them
        all) and counting them as done.

        The row is queued, then this worker lets the tasks already woken in this turn run
        (they queue theirs), and the first of them back writes every queued row: no task or
        event is needed to gather a turn's rows. A worker sends its next request only once
        its row is written (or the write failed and the run stops): what a failed write or a
        kill can cost stays the requests in flight, one a worker. (Written out here, not in
        a coroutine of its own: that would cost one more coroutine a row.)
        """
        async with receive:
            rows = self.rows
            retries = _RetryLog(self.tally, rows.row_id)
            policy = RetryPolicy(
                self.job.limits,
                before_sleep=retries.before_sleep,
                sleep=self._sleep_unless_stopping,
            )
            while True:
                try:  # an item waiting is taken without a trip through the event loop
                    work = receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        work = await receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                if self.stopping:
                    continue
                retries.work = work
                end = await rows.make(work, policy)
                if end.stop is not None:
                    self.stop(end.stop)
                if end.result is not None:  # paid answers of a row cut short are kept too
                    # journalled with the other rows finished in this turn (see above)
                    self.writer.queue(end.result)
                    await self._next_turn()
                    self._write_journal()  # nothing left if another worker wrote this turn's

    def _write_journal(self) -> None:
        """Journal the queued rows, then count them as done."""
        writer = self.writer
        try:
            rows = writer.write_queued()
        except OSError as exc:  # a full disk, a folder turned read-only: what is journalled stays
            self.stop(cannot_write(writer.directory, exc))
            return
        if not rows:
            return
        tally = self.tally
        tally.journal_writes += 1
        for row in rows:
            tally.record_row(row)
        settings = self.settings
        if len(writer) >= settings.flush_rows or writer.journal_bytes >= settings.flush_bytes:
            self._flush_wanted.set()

    async def _send(self, body: dict[str, Any], position: int, attempt: Attempt) -> Completion:
        """`client.send` through the endpoint gate: while the endpoint is down, a failure to
        reach it is not the row's, so the request waits its turn and goes again within the
        same attempt (`attempt.resent` then notes the time it really leaves).

        The attempt's lease deadline is deferred (`AttemptMeter.attempt`): the fast path, a
        first send while the endpoint is up, goes under none, because the client's own
        deadline (`timeout`) ends it before the lease expires (`Attempt.outlasts`). What
        follows a failure, and any send that may outlive the lease, goes under
        `attempt.deadline()`.

        The fast path awaits `client.send` itself, not through `_send_one`: every time the
        request in flight resumes, it passes through each coroutine it is awaited from, and
        one layer fewer costs less CPU a request (issue 12). What it does with the answer
        or the failure is `_send_one`'s (`gate.answered`, `_failed`).
        """
        gate = self.gate
        if gate.open and attempt.outlasts(self.client.timeout):
            sent_at = self.meter.time()
            try:
                answer = await self.client.send(body)
            except BaseException as exc:
                result = self._failed(exc, probing=False, sent_at=sent_at)
            else:
                gate.answered(probing=False, sent_at=sent_at)
                return answer
            with attempt.deadline():
                await self._judge(result, position, probing=False, sent_at=sent_at)
                return await self._send_through_gate(body, position, attempt)
        with attempt.deadline():
            return await self._send_through_gate(body, position, attempt)

    async def _send_through_gate(
        self, body: dict[str, Any], position: int, attempt: Attempt
    ) -> Completion:
        """Send at the gate's turn until answered: while the endpoint is down, one probe at a
        time; a failure that is the endpoint's goes again."""
        gate = self.gate
        while True:
            waits = gate.down
            try:
                probing = await gate.wait_turn()
            except GateClosed:
                raise Abandoned from None
            if waits:
                attempt.resent()
            sent_at = self.meter.time()
            result = await self._send_one(body, probing=probing, sent_at=sent_at)
            if isinstance(result, Completion):
                return result
            await self._judge(result, position, probing=probing, sent_at=sent_at)

    async def _send_one(
        self, body: dict[str, Any], *, probing: bool, sent_at: float
    ) -> Completion | RetryableError | NotAnEndpoint:
        """One send: the answer, or the failure to reach the endpoint that the gate judges
        (`_judge`). Any other error is raised once the gate knows the endpoint answered."""
        try:
            answer = await self.client.send(body)
        except BaseException as exc:
            return self._failed(exc, probing=probing, sent_at=sent_at)
        self.gate.answered(probing=probing, sent_at=sent_at)
        return answer

    def _failed(
        self, exc: BaseException, *, probing: bool, sent_at: float
    ) -> RetryableError | NotAnEndpoint:
        """A send's failure: returned if it is a failure to reach the endpoint, for the gate
        to judge (`_judge`); any other error is raised again once the gate knows whether
        the endpoint answered."""
        gate = self.gate
        if isinstance(exc, ConnectFailed | NotAnEndpoint):
            return exc
        if isinstance(exc, RetryableError):
            if exc.error_class == "network":
                return exc
            gate.answered(probing=probing, sent_at=sent_at)
        elif isinstance(exc, RequestError | RunStopped):
            gate.answered(probing=probing, sent_at=sent_at)
        else:
            gate.release(probing=probing)
        raise exc

    async def _judge(
        self,
        failure: RetryableError | NotAnEndpoint,
        position: int,
        *,
        probing: bool,
        sent_at: float,
    ) -> None:
        """Raise a failure to reach the endpoint as the row's (one flaky connection: a normal
        retry), unless the gate finds the endpoint down: then return, to go again."""
        if not await self.gate.failed(failure, row=position, probing=probing, sent_at=sent_at):
            raise failure
        if self.stopping:
            raise Abandoned

    # -- writing ----------------------------------------------------------------------------

    async def _flush_periodically(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.flush_seconds):
                await self._flush_wanted.wait()
            self._flush_wanted = anyio.Event()
            with anyio.CancelScope(shield=True):  # rows taken for a part are always written
                await self.flush()

    async def flush(self, *, in_thread: bool = True) -> None:
        """Write buffered results to a new part file.

        Args:
            in_thread: write it in a worker thread, so that requests in flight are not held
                up by the conversion and the fsyncs (milliseconds for a part of thousands of
                rows). The run's last flush writes it in the loop's own thread: every worker
                is done by then, so there is nothing to hold up, and the hop (a thread hand-
                over and a wake-up of the loop) would only cost.
        """
        async with self._flush_lock:
            self._write_journal()  # rows queued this turn go in this part
            taken = self.writer.take()
            if taken is None:
                return
            path, rows = taken
            try:
                if in_thread:
                    await anyio.to_thread.run_sync(self.writer.write_part, path, rows)
                else:
                    self.writer.write_part(path, rows)
            except OSError as exc:
                # the rows stay in their journal segment: the next run makes the part
                self.stop(cannot_write(self.writer.directory, exc))
                return
            log.debug("checkpoint_flushed", part=path.name, rows=len(rows))

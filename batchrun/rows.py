"""One work item to one result row: cache claim, asks and parse re-asks, usage summed.

A row's progress lives in a `RowState`; `RowMaker.make` gives the `RowEnd` saying what to
keep and whether the run must stop. An ask's first request is sent directly (the common case:
answered at once); one that failed goes on through the retry policy. Each attempt goes
through the `AttemptMeter`. A 429 is not a row's failure while the server answers other
requests: the attempt waits for the limiter and sends again, costing no `max_attempts`, for
at most `timeout` seconds, and only while some request was answered within `outage_timeout`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from batchrun.cache import RequestCache, request_key
from batchrun.client import Completion
from batchrun.errors import PermanentError, RateLimited, RequestError, RetryableError, RunStopped
from batchrun.job import Job
from batchrun.meter import Attempt, AttemptMeter, MeteredRequest
from batchrun.progress import Tally, add_reported
from batchrun.prompts import RequestShape, Variant, build_request
from batchrun.retry import RetryPolicy
from batchrun.sinks import (
    INDEX_COLUMN,
    PAID_BEFORE_COLUMN,
    USAGE_COLUMNS,
    result_column_names,
)
from batchrun.sources import InputRow, InputSummary
from batchrun.structured import ParseFailed, parse_fields

log = structlog.get_logger("batchrun")


def summed(answers: list[Completion]) -> Completion:
    """The last answer, with the usage of every answer the row paid for."""
    total = dataclasses.replace(answers[-1])
    for name in USAGE_COLUMNS:
        value: int | None = None
        for answer in answers:
            value = add_reported(value, getattr(answer, name))
        setattr(total, name, value)
    return total


#: result columns that a parsed field of the same name does not replace
_SET_LAST = ("cost_usd", "cost_worst_case", "cached", PAID_BEFORE_COLUMN)


class Abandoned(Exception):
    """Raised inside a row's asks when the run is stopping: the row is not recorded."""


@dataclass(slots=True)
class Work:
    """One request to make: an input row in one sweep variant, at its output position."""

    row: InputRow
    variant: int
    position: int
    #: `time.perf_counter()` when the pool's producer handed it on to the workers (set there,
    #: one clock read a row): a row's `queued_s` counts from here, so it includes the wait
    #: for a worker as well as for the limiter's slot
    queued_at: float = 0.0


@dataclass(slots=True)
class RowState:
    """A row's progress through its requests (attempts and parse re-asks): what was sent,
    what it cost, and how much of that cost is already journaled."""

    work: Work
    #: `time.perf_counter()` when the row was handed on to the workers (`Work.queued_at`)
    taken: float
    answers: list[Completion] = field(default_factory=list)
    #: requests actually sent
    attempts: int = 0
    #: 429 answers met, the re-sends within an attempt included
    rate_limited: int = 0
    #: USD of every answer paid for; None while no answer has a known price
    cost: float | None = None
    #: some answer came without usage and is counted at its worst case
    worst_case: bool = False
    #: the part of `cost` already journaled in rows written before this row's last one
    journaled: float = 0.0
    #: `time.perf_counter()` when the first request left, and its wall-clock time in epoch
    #: microseconds (`sinks.EPOCH_US_COLUMNS`)
    first_sent: float | None = None
    started_at: int | None = None
    #: seconds spent waiting on the server, summed over every request sent
    in_requests: float = 0.0
    #: the answer came from the request cache
    cached: bool = False
    failure: RequestError | None = None
    parsed: dict[str, Any] | None = None

    def count(self, attempt: Attempt) -> None:
        """Add what one attempt sent and cost."""
        if attempt.started is not None:
            self.attempts += 1
            if self.first_sent is None:
                self.first_sent = attempt.started
                self.started_at = attempt.sent_us
            self.in_requests += attempt.seconds
        charge = attempt.charge
        if charge is not None:
            if charge.usd is not None:
                self.cost = charge.usd if self.cost is None else self.cost + charge.usd
            self.worst_case = self.worst_case or charge.worst_case


@dataclass(slots=True)
class RowEnd:
    """What became of a work item: the row to keep (if any) and whether the run must stop."""

    result: dict[str, Any] | None
    #: the run must stop for this reason (None: abandoned because it is stopping already)
    stop: RunStopped | None = None


@dataclass
class RowMaker:
    """Turns work items into result rows; one per run, shared by its workers.

    Args:
        send: sends a body for a position under its `Attempt` (through the endpoint gate),
            raising `Abandoned` when the run stops meanwhile. It keeps the lease's deadline
            itself (`AttemptMeter.attempt`'s deferred deadline): it waits only where the wait
            is known to end before the lease expires, or under `attempt.deadline()`, so the
            common attempt enters no cancel scope.
        journal: writes a row at once, before it is final (paid answers of a re-asked row).
        keep: records a finished row (used for the paid answers of a row cancelled outright);
            the next journal write (at the latest, the run's last flush) counts it as done.
        stopping: whether the run is stopping.
        sleep: sleeps, returning early when the run stops.
    """

    job: Job
    scan: InputSummary
    meter: AttemptMeter
    tally: Tally
    send: Callable[[dict[str, Any], int, Attempt], Awaitable[Completion]]
    journal: Callable[[dict[str, Any]], None]
    keep: Callable[[dict[str, Any]], None]
    stopping: Callable[[], bool]
    sleep: Callable[[float], Awaitable[None]]
    variants: list[Variant]
    cache: RequestCache | None = None

    def __post_init__(self) -> None:
        self.shapes = [RequestShape.from_job(self.job, v.settings) for v in self.variants]
        self.variant_columns = [v.columns() for v in self.variants] if self.job.sweep else None
        self.carry = tuple(self.job.prompt.carry)
        self.parse = self.job.parse
        self.now_us = self.meter.now_us  # when a row is finished, read once a row
        #: a result row before its values: every column, in output order (`_finish`)
        self._blank: dict[str, Any] = dict.fromkeys(
            (INDEX_COLUMN, "id", *result_column_names(), PAID_BEFORE_COLUMN)
        )
        self._ids, self._input = self.scan.ids, self.job.input  # read for every row

    def row_id(self, work: Work) -> str:
        """The row's id as text, for logs: worked out only when something is logged."""
        return self.scan.ids.text(work.row, self.job.input)

    def make(self, work: Work, policy: RetryPolicy) -> Coroutine[Any, Any, RowEnd]:
        """The row of a work item: from the cache, or asked (and re-asked until it parses).

        Not itself a coroutine: it builds the request, then hands back the coroutine that
        asks (`_ask`), so that a request in flight has one coroutine layer fewer to pass
        through each time it resumes.
        """
        state = RowState(work, work.queued_at or time.perf_counter())
        request = self.meter.request(build_request(work.row.data, self.shapes[work.variant]))
        if self.cache is not None:
            return self._make_through_cache(self.cache, state, request, policy)
        return self._ask(state, request, policy)

    async def _make_through_cache(
        self, cache: RequestCache, state: RowState, request: MeteredRequest, policy: RetryPolicy
    ) -> RowEnd:
        """`make` with the request cache: a cached answer is claimed, a new one put."""
        variant = self.variants[state.work.variant]
        # repeats of one combination are meant to be sampled again, not served twice
        salt = f"repeat {variant.repeat}" if variant.repeats > 1 else ""
        key = request_key(request.body, salt=salt)
        cached = await cache.claim(key)
        if cached is not None:
            state.cached = True
            state.answers.append(cached)
            state.parsed, state.failure = self._parsed(cached)
            return RowEnd(self._finish(state))
        try:
            end = await self._ask(state, request, policy)
            if end.stop is None and state.failure is None and state.answers:  # not cut short
                cache.put(key, state.answers[-1])
        finally:
            cache.release(key)
        return end

    async def _ask(self, state: RowState, request: MeteredRequest, policy: RetryPolicy) -> RowEnd:
        """Ask, and re-ask while the answer does not parse; what to keep, and whether the run
        must stop.

        Each ask's first request is sent straight from here: most are answered at once, and
        each coroutine layer costs CPU at every resumption of a request in flight. Only a
        failed first send goes on through the 429 re-sends and the retry policy
        (`_ask_again`), which then see exactly what they would have seen from the start.
        When the attempt's budgets are at hand, even `_send_once` is skipped: the request is
        awaited here (`_sending_at_once`).
        """
        asks_left = 1 + (self.parse.parse_attempts if self.parse else 0)
        while asks_left:
            asks_left -= 1
            began = time.perf_counter()
            try:
                try:
                    attempt = self._sending_at_once(state, request)
                    if attempt is None:
                        completion = await self._send_once(state, request)
                    else:  # `_send_once`'s steps, awaited here: see `_sending_at_once`
                        try:
                            completion = await self.send(request.body, state.work.position, attempt)
                        except BaseException as exc:
                            self._sent(state, attempt, None, exc)
                            raise
                        self._sent(state, attempt, completion, None)
                except RetryableError as exc:
                    completion = await self._ask_again(state, request, policy, exc, began)
            except RequestError as exc:
                state.failure = exc
                break
            except (Abandoned, RunStopped) as exc:
                # a paid answer that did not parse is kept; then the run stops
                cut = self._cut_short(state) if state.answers else None
                return RowEnd(cut, stop=exc if isinstance(exc, RunStopped) else None)
            except anyio.get_cancelled_exc_class():
                if state.answers:  # cancelled outright: write the paid answers before going
                    self.keep(self._cut_short(state))
                raise
            state.answers.append(completion)
            if self.parse is None:
                break
            state.parsed, state.failure = self._parsed(completion)
            if state.failure is None:
                break
            if asks_left:  # re-asked next: what is paid so far is journaled now
                self._journal_paid(state)
        return RowEnd(self._finish(state))

    async def _ask_again(
        self,
        state: RowState,
        request: MeteredRequest,
        policy: RetryPolicy,
        error: RetryableError,
        began: float,
    ) -> Completion:
        """The rest of an ask whose first send failed with `error`: a 429 is sent again
        within the same attempt (`_attempt`, which began at `began`), and a failed attempt
        goes to the retry policy, as attempt 1 of its count."""
        if isinstance(error, RateLimited):
            try:
                return await self._attempt(state, request, began=began, refused=error)
            except RetryableError as exc:
                error = exc
        return await policy.retry(error, lambda: self._attempt(state, request))

    async def _attempt(
        self,
        state: RowState,
        request: MeteredRequest,
        *,
        began: float | None = None,
        refused: RateLimited | None = None,
    ) -> Completion:
        """One attempt: sent again after each 429 while the server answers other requests.

        Args:
            began: `time.perf_counter()` when the attempt began, if before this call (the
                window is timed like the row's latency: a read costs a tenth of
                `anyio.current_time()`, and one is taken for every ask).
            refused: the 429 its first send met, if it was sent before this call.
        """
        limits = self.job.limits
        if began is None:
            began = time.perf_counter()
        refusals = 0
        while True:
            if refused is None:
                try:
                    return await self._send_once(state, request)
                except RateLimited as exc:
                    refused = exc
            state.rate_limited += 1
            elapsed = time.perf_counter() - began
            if elapsed >= limits.timeout or not self.meter.answering(limits.outage_timeout):
                raise refused  # rate-limited alone for too long: a failed attempt after all
            refusals += 1
            self.tally.retries_by_class[refused.error_class] += 1
            log.info("rate_limit_wait", row_id=self.row_id(state.work), refused=refusals)
            refused = None
            await self._back_off(refusals)

    async def _back_off(self, refused: int) -> None:
        """Wait before sending again after a 429: the limiter's shared pause if it set one,
        else a growing backoff of this row's own."""
        if self.meter.limiter.statistics().paused_for > 0:
            return  # the next reservation waits out the pause
        limits = self.job.limits
        delay = min(limits.max_backoff, limits.initial_backoff * 2 ** min(refused - 1, 30))
        await self.sleep(delay * random.uniform(0.5, 1.0))

    async def _send_once(self, state: RowState, request: MeteredRequest) -> Completion:
        if self.stopping():
            raise Abandoned
        attempt = self.meter.attempt(request, deferred_deadline=True)
        try:
            async with attempt:
                if self.stopping():  # stopped while waiting for the budget: nothing is sent
                    raise Abandoned
                self._begin(attempt)
                answer: Completion | None = None
                try:
                    answer = await self.send(request.body, state.work.position, attempt)
                finally:
                    self._back(attempt, answer)
        finally:
            state.count(attempt)
        assert attempt.answer is not None
        return attempt.answer

    def _sending_at_once(self, state: RowState, request: MeteredRequest) -> Attempt | None:
        """The start of `_send_once` for the common first send (issue 12): when the meter
        takes and settles the attempt's budgets without a wait (`Attempt.enter_at_once`),
        the attempt is entered and counted as sent here, and `_ask` awaits `send` itself: a
        request in flight then resumes through one coroutine fewer, and no `async with`
        coroutines are made.
        Returns None, with nothing taken, where anything would wait or the run is stopping:
        then `_send_once`. The same steps as `_send_once`'s, none of which can suspend;
        `_sent` ends it as leaving `_send_once`'s block does."""
        if self.stopping():
            return None
        attempt = self.meter.attempt(request, deferred_deadline=True)
        if not attempt.enter_at_once():
            return None
        self._begin(attempt)
        return attempt

    def _begin(self, attempt: Attempt) -> None:
        """Count an entered attempt's request as sent (both ways of sending)."""
        attempt.sending()
        tally = self.tally
        tally.requests += 1
        tally.in_flight += 1

    def _back(self, attempt: Attempt, answer: Completion | None) -> None:
        """Count a sent request as back: answered with `answer`, or failed (None)."""
        self.tally.in_flight -= 1
        if answer is not None:
            attempt.received(answer)

    def _sent(
        self,
        state: RowState,
        attempt: Attempt,
        answer: Completion | None,
        error: BaseException | None,
    ) -> None:
        """End an attempt begun by `_sending_at_once`: answered, or failed with `error`."""
        self._back(attempt, answer)
        try:
            attempt.leave_at_once(error)
        finally:
            state.count(attempt)

    def _journal_paid(self, state: RowState) -> None:
        """Journal the paid answers of a row about to be re-asked, so that a kill before the
        next answer loses neither them nor their cost. The row is not counted as done: its
        later row for the same position supersedes it."""
        result = self._finish(state)  # its parse failure recorded, as if it were the last
        self.journal(result)
        state.journaled = result["cost_usd"] or 0.0

    def _cut_short(self, state: RowState) -> dict[str, Any]:
        """The row of paid answers that never parsed, when the run stops before a re-ask."""
        state.failure = PermanentError(
            "the run stopped before an answer parsed", error_class="parse"
        )
        state.parsed = None
        return self._finish(state)

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

    def _finish(self, state: RowState) -> dict[str, Any]:
        """The result row: the last answer, with the usage of every answer paid for.

        A row is made for every request, so each column's cost counts (issue 12): the row
        starts as a copy of `_blank` (every column, in output order, None) and only the
        columns with a value are set, one clock read a row. A copy and the assignments take
        about a third of the time of one dict display with a condition a column."""
        work, answers, cached, failure = state.work, state.answers, state.cached, state.failure
        row = work.row
        result = self._blank.copy()
        result[INDEX_COLUMN] = work.position
        result["id"] = self._ids.output_value(row, self._input)  # the user's, typed
        if answers:
            c = summed(answers) if len(answers) > 1 else answers[0]
            result["status"] = "ok" if failure is None else "error"
            result["content"] = c.content
            result["reasoning_content"] = c.reasoning_content
            result["finish_reason"] = c.finish_reason
            result["model"] = c.model
            for name in USAGE_COLUMNS:
                result[name] = getattr(c, name)
            result["http_status"] = c.http_status
            result["response_id"] = c.response_id
        else:
            result["status"] = "error"
            result["http_status"] = failure.status if failure else None
        result["attempts"] = state.attempts
        result["rate_limited"] = state.rate_limited
        first_sent = state.first_sent
        if first_sent is not None:
            result["latency_s"] = state.in_requests
            result["queued_s"] = first_sent - state.taken
        if failure is not None:
            result["error"] = failure.message
            result["error_class"] = failure.error_class
        now = self.now_us()
        result["started_at"] = now if state.started_at is None else state.started_at
        result["finished_at"] = now
        result["cost_usd"] = 0.0 if cached else state.cost
        result["cost_worst_case"] = False if cached else state.worst_case
        result["cached"] = cached
        result[PAID_BEFORE_COLUMN] = state.journaled
        if self.carry:  # the job's carried columns come first; a result column wins
            data = row.data
            result = {**{name: data.get(name) for name in self.carry}, **result}
        if self.variant_columns is not None or self.parse is not None:
            self._add_sweep_and_parsed(result, state)
        return result

    def _add_sweep_and_parsed(self, result: dict[str, Any], state: RowState) -> None:
        """A sweep's variant columns and the parsed fields; the cost columns still win."""
        last = {name: result[name] for name in _SET_LAST}
        if self.variant_columns is not None:
            result.update(self.variant_columns[state.work.variant])
        if self.parse is not None:
            for name in self.parse.fields:
                result[name] = state.parsed.get(name) if state.parsed else None
        result.update(last)

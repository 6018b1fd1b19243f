"""What a run has done so far (`Tally`), and how it is shown while the run goes on.

The pool updates one `Tally`; the progress reporter and the final summary read snapshots of it.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from batchrun.logs import display_up
from batchrun.sinks import INDEX_COLUMN, USAGE_COLUMNS


@dataclass(frozen=True)
class RunStatistics:
    """A snapshot of a run's counters."""

    rows_total: int
    rows_skipped: int
    rows_done: int
    rows_ok: int
    rows_error: int
    errors_by_class: dict[str, int]
    retries_by_class: dict[str, int]
    #: requests actually sent (attempts and re-asks), not ones abandoned before sending
    requests: int
    in_flight: int
    #: token sums; None when no answer of this run reported the figure (not zero)
    prompt_tokens: int | None
    completion_tokens: int | None
    cache_hit_tokens: int | None
    cache_miss_tokens: int | None
    reasoning_tokens: int | None
    #: USD of the rows whose cost is known
    cost_usd: float
    #: rows whose cost counts an answer without usage at its worst case (so, an upper bound)
    rows_worst_case: int
    #: rows answered whose cost is not known (their model has no price)
    rows_unpriced: int
    elapsed_s: float
    #: why sending is held back, if it is ("waiting for off-peak until 10:00 UTC ...")
    waiting: str | None = None
    #: rows whose latest result in the checkpoint was an error when the run began: the run
    #: asks them again
    rows_prior_error: int = 0
    #: of those, how many this run has given a new result
    rows_redone: int = 0
    #: write calls to the journal: each holds the rows finished in one event-loop turn
    journal_writes: int = 0
    #: worker tasks the pool started (it starts them as the limiter's concurrency grows)
    workers: int = 0

    @property
    def rows_remaining(self) -> int:
        return self.rows_total - self.rows_skipped - self.rows_done

    # the whole job's counts, what the display shows: the rows done before this run (ok ones
    # skipped, error ones until this run redoes them) and this run's, as `status` and the
    # closing summary count them

    @property
    def job_rows_ok(self) -> int:
        return self.rows_skipped + self.rows_ok

    @property
    def job_rows_error(self) -> int:
        return self.rows_prior_error - self.rows_redone + self.rows_error

    @property
    def job_rows_done(self) -> int:
        return self.job_rows_ok + self.job_rows_error

    @property
    def projected_cost_usd(self) -> float:
        """Spend so far plus the remaining rows at this run's mean cost per row."""
        if self.rows_done == 0:
            return self.cost_usd
        return self.cost_usd + self.cost_usd / self.rows_done * self.rows_remaining

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


def add_reported(total: int | None, value: int | None) -> int | None:
    """A sum that stays None until some row reports the figure."""
    if value is None:
        return total
    return value if total is None else total + value


#: the usage columns a run's statistics sum (nothing reads a sum of `total_tokens`)
TALLIED_USAGE = tuple(name for name in USAGE_COLUMNS if name != "total_tokens")


@dataclass
class Tally:
    """Mutable counters, updated by the workers of one run."""

    rows_total: int = 0
    rows_skipped: int = 0
    rows_done: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    requests: int = 0
    in_flight: int = 0
    #: each usage figure the statistics report summed over the journalled rows, by its
    #: column's name (`TALLIED_USAGE`); None until some row reports it
    usage: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(TALLIED_USAGE))
    cost_usd: float = 0.0
    rows_worst_case: int = 0
    rows_unpriced: int = 0
    journal_writes: int = 0
    workers: int = 0
    errors_by_class: Counter[str] = field(default_factory=Counter)
    retries_by_class: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    #: set by the off-peak schedule while requests wait for off-peak (`schedule`)
    waiting: str | None = None
    #: a byte per position, set where the checkpoint held an error when the run began
    #: (`ResumeState.error_mask`); cleared as this run redoes the row
    prior_errors: bytearray | None = None
    rows_prior_error: int = 0
    rows_redone: int = 0

    def __post_init__(self) -> None:
        if self.prior_errors is not None:
            self.rows_prior_error = self.prior_errors.count(1)

    def record_row(self, row: dict[str, Any]) -> None:
        """Count a journalled row (called for every row: kept to counters and sums)."""
        self.rows_done += 1
        prior = self.prior_errors
        if prior is not None:
            position = row.get(INDEX_COLUMN)
            if isinstance(position, int) and 0 <= position < len(prior) and prior[position]:
                prior[position] = 0
                self.rows_redone += 1
        if row["status"] == "ok":
            self.rows_ok += 1
        else:
            self.rows_error += 1
            self.errors_by_class[row.get("error_class") or "unknown"] += 1
        usage = self.usage
        for name in TALLIED_USAGE:
            if (value := row[name]) is not None:
                total = usage[name]
                usage[name] = value if total is None else total + value
        cost = row.get("cost_usd")
        if cost is not None:
            self.cost_usd += cost
        elif row.get("content") is not None:  # answered, but its model has no price
            self.rows_unpriced += 1
        if row.get("cost_worst_case"):
            self.rows_worst_case += 1

    def statistics(self) -> RunStatistics:
        usage = self.usage
        return RunStatistics(
            rows_total=self.rows_total,
            rows_skipped=self.rows_skipped,
            rows_done=self.rows_done,
            rows_ok=self.rows_ok,
            rows_error=self.rows_error,
            errors_by_class=dict(self.errors_by_class),
            retries_by_class=dict(self.retries_by_class),
            requests=self.requests,
            in_flight=self.in_flight,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            cache_hit_tokens=usage["prompt_cache_hit_tokens"],
            cache_miss_tokens=usage["prompt_cache_miss_tokens"],
            reasoning_tokens=usage["reasoning_tokens"],
            cost_usd=self.cost_usd,
            rows_worst_case=self.rows_worst_case,
            rows_unpriced=self.rows_unpriced,
            elapsed_s=time.monotonic() - self.started,
            waiting=self.waiting,
            rows_prior_error=self.rows_prior_error,
            rows_redone=self.rows_redone,
            journal_writes=self.journal_writes,
            workers=self.workers,
        )


def combine(
    parts: list[RunStatistics],
    *,
    rows_total: int,
    rows_skipped: int,
    elapsed_s: float,
    rows_prior_error: int = 0,
) -> RunStatistics:
    """The statistics of one run made of several pools (`--engine ray`'s shards): counters
    summed, token figures left None where no part reported them.

    Args:
        rows_skipped, rows_prior_error: the run's, from the checkpoint when it began (each
            part counts only its own shard's).
    """
    tokens: dict[str, int | None] = {}
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "cache_hit_tokens",
        "cache_miss_tokens",
        "reasoning_tokens",
    ):
        total: int | None = None
        for part in parts:
            total = add_reported(total, getattr(part, name))
        tokens[name] = total
    errors: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors_by_class)
        retries.update(part.retries_by_class)
    return RunStatistics(
        rows_total=rows_total,
        rows_skipped=rows_skipped,
        rows_done=sum(p.rows_done for p in parts),
        rows_ok=sum(p.rows_ok for p in parts),
        rows_error=sum(p.rows_error for p in parts),
        errors_by_class=dict(errors),
        retries_by_class=dict(retries),
        requests=sum(p.requests for p in parts),
        in_flight=sum(p.in_flight for p in parts),
        cost_usd=sum(p.cost_usd for p in parts),
        rows_worst_case=sum(p.rows_worst_case for p in parts),
        rows_unpriced=sum(p.rows_unpriced for p in parts),
        elapsed_s=elapsed_s,
        waiting=next((p.waiting for p in parts if p.waiting), None),
        rows_prior_error=rows_prior_error,
        rows_redone=sum(p.rows_redone for p in parts),
        journal_writes=sum(p.journal_writes for p in parts),
        workers=sum(p.workers for p in parts),
        **tokens,
    )


def _eta(stats: RunStatistics) -> float | None:
    if stats.rows_done == 0 or stats.elapsed_s <= 0:
        return None
    return stats.rows_remaining / (stats.rows_done / stats.elapsed_s)


def progress_fields(stats: RunStatistics, limiter: Any = None, gate: Any = None) -> dict[str, Any]:
    """The figures a progress line or display shows (`endpoint` only while it is down)."""
    elapsed = stats.elapsed_s or 1e-9
    fields: dict[str, Any] = {
        # the whole job's rows, as `status` and the closing summary count them
        "done": stats.job_rows_done,
        "total": stats.rows_total,
        "ok": stats.job_rows_ok,
        "errors": stats.job_rows_error,
        "requests_per_s": round(stats.requests / elapsed, 1),
        "prompt_tokens_per_s": round((stats.prompt_tokens or 0) / elapsed),
        "completion_tokens_per_s": round((stats.completion_tokens or 0) / elapsed),
        "spent_usd": round(stats.cost_usd, 6),
        "projected_usd": round(stats.projected_cost_usd, 6),
        "eta_s": None if (eta := _eta(stats)) is None else round(eta, 1),
        "in_flight": stats.in_flight,
    }
    if limiter is not None:
        limits = limiter.statistics()
        fields["concurrency"] = limits.concurrency
        fields["cooling_down_s"] = round(limits.paused_for, 2)
    if stats.retries_by_class:
        fields["retries"] = dict(sorted(stats.retries_by_class.items()))
    note = gate.statistics().note if gate is not None else None
    if note is not None:
        fields["endpoint"] = note
    if stats.waiting is not None:
        fields["schedule"] = stats.waiting
    return fields


async def report_periodically(
    tally: Tally, every: float = 5.0, limiter: Any = None, gate: Any = None
) -> None:
    """Log a short progress line every few seconds (when there is no terminal display)."""
    log = structlog.get_logger("batchrun.progress")
    while True:
        await anyio.sleep(every)
        log.info("progress", **progress_fields(tally.statistics(), limiter, gate))


#: the display's labels: their column is as wide as the longest, so that a line that comes
#: and goes (retries) does not shift the others
_LABELS = ("rows", "rate", "cost", "eta", "pool", "retries")


def render(stats: RunStatistics, limiter: Any = None, gate: Any = None) -> Any:
    """The live display of `stats`: a rich renderable."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    fields = progress_fields(stats, limiter, gate)
    done, total = fields["done"], max(fields["total"], 1)
    eta = fields["eta_s"]
    grid = Table.grid(padding=(0, 2))
    width = max(len(label) for label in _LABELS)
    grid.add_column(justify="right", style="bold", width=width, no_wrap=True)
    grid.add_column()
    grid.add_row(
        "rows",
        f"{done}/{fields['total']} ({done / total:.0%})  ok {fields['ok']}  "
        f"errors {fields['errors']}",
    )
    grid.add_row("", ProgressBar(total=total, completed=done, width=40))
    grid.add_row(
        "rate",
        f"{fields['requests_per_s']} req/s  tokens/s prompt {fields['prompt_tokens_per_s']} "
        f"completion {fields['completion_tokens_per_s']}",
    )
    grid.add_row(
        "cost",
        f"${fields['spent_usd']:.4f} spent, ${fields['projected_usd']:.4f} projected",
    )
    grid.add_row("eta", "-" if eta is None else f"{eta:.0f} s")
    concurrency = fields.get("concurrency", "-")
    cooling = fields.get("cooling_down_s") or 0
    state = f"cooling down {cooling:.1f} s" if cooling > 0 else "sending"
    if "schedule" in fields:
        state = fields["schedule"]
    if "endpoint" in fields:
        state = fields["endpoint"]
    grid.add_row("pool", f"{fields['in_flight']} in flight, limit {concurrency}, {state}")
    retries = fields.get("retries")
    if retries:
        grid.add_row("retries", "  ".join(f"{k} {v}" for k, v in retries.items()))
    return grid


@contextlib.contextmanager
def live_snapshots(first: RunStatistics) -> Iterator[Callable[[RunStatistics], None]]:
    """The live display for a caller that polls its counters (the Ray driver, adding up
    its workers): yields the function that shows each new snapshot."""
    from rich.console import Console
    from rich.live import Live

    with (
        display_up(),
        Live(
            render(first, None),
            console=Console(stderr=True),
            refresh_per_second=4,
            transient=False,
            redirect_stderr=True,
            redirect_stdout=False,
        ) as live,
    ):
        yield lambda stats: live.update(render(stats, None))


async def live_display(
    tally: Tally, limiter: Any = None, gate: Any = None, every: float = 0.25
) -> None:
    """Redraw a rich display on the terminal until cancelled."""
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    with (
        display_up(),
        Live(
            render(tally.statistics(), limiter, gate),
            console=console,
            refresh_per_second=4,
            transient=False,
            redirect_stderr=True,
            redirect_stdout=False,
        ) as live,
    ):
        try:
            while True:
                await anyio.sleep(every)
                live.update(render(tally.statistics(), limiter, gate))
        finally:
            live.update(render(tally.statistics(), limiter, gate))

"""What a run has done so far (`Tally`), and how it is shown while the run goes on.

The pool updates one `Tally`; the progress reporter and the final summary read snapshots of it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog


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
    requests: int
    in_flight: int
    prompt_tokens: int
    completion_tokens: int
    cache_hit_tokens: int
    cache_miss_tokens: int
    reasoning_tokens: int
    elapsed_s: float

    @property
    def rows_remaining(self) -> int:
        return self.rows_total - self.rows_skipped - self.rows_done

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hit_tokens: int = 0
    cache_miss_tokens: int = 0
    reasoning_tokens: int = 0
    errors_by_class: Counter[str] = field(default_factory=Counter)
    retries_by_class: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def record_row(self, row: dict[str, Any]) -> None:
        self.rows_done += 1
        if row["status"] == "ok":
            self.rows_ok += 1
        else:
            self.rows_error += 1
            self.errors_by_class[row.get("error_class") or "unknown"] += 1
        self.prompt_tokens += row["prompt_tokens"] or 0
        self.completion_tokens += row["completion_tokens"] or 0
        self.cache_hit_tokens += row["prompt_cache_hit_tokens"] or 0
        self.cache_miss_tokens += row["prompt_cache_miss_tokens"] or 0
        self.reasoning_tokens += row["reasoning_tokens"] or 0

    def statistics(self) -> RunStatistics:
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
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cache_hit_tokens=self.cache_hit_tokens,
            cache_miss_tokens=self.cache_miss_tokens,
            reasoning_tokens=self.reasoning_tokens,
            elapsed_s=time.monotonic() - self.started,
        )


async def report_periodically(tally: Tally, every: float = 5.0) -> None:
    """Log a short progress line every few seconds (for runs without a terminal display)."""
    log = structlog.get_logger("batchrun.progress")
    while True:
        await anyio.sleep(every)
        stats = tally.statistics()
        log.info(
            "progress",
            done=stats.rows_done + stats.rows_skipped,
            total=stats.rows_total,
            ok=stats.rows_ok,
            errors=stats.rows_error,
            in_flight=stats.in_flight,
            requests_per_s=round(stats.requests_per_s, 1),
        )

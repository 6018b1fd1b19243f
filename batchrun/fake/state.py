"""Everything the fake remembers between requests: counters, request log, cache, spend, limits.

Owned by the server's event loop; other threads reach it through `FakeServer`, which hops
onto the loop first.
"""

from __future__ import annotations

from collections import deque
from random import Random
from typing import Any

from batchrun.fake.config import FakeConfig
from batchrun.fake.faults import FaultPlanner
from batchrun.fake.limits import Limits, RateLimiter

#: Request-log cap, so a long benchmark cannot exhaust memory (the newest entries are kept).
LOG_CAP = 200_000
#: Prompt-cache cap: past it the cache is emptied, as a real cache evicts.
CACHE_CAP = 1_000_000


class FakeState:
    """The mutable state behind one fake server."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.limiter = RateLimiter()
        self.log: deque[Any] = deque(maxlen=LOG_CAP)
        self.cache: set[int] = set()
        self.requests = 0
        self.ok = 0
        self.by_status: dict[int, int] = {}
        self.faults: dict[str, int] = {}
        self.rate_limited = 0
        self.tokens_served = 0
        self.completions = 0
        self.planner = FaultPlanner(config.seed)
        self.jitter = Random(f"{config.seed}:jitter")

    def reset(self, config: FakeConfig | None = None) -> None:
        """Clear counters, log, cache, spend, fault scripts and windows; maybe swap config."""
        if config is not None:
            self.config = config
        self.limiter.clear()
        self.log.clear()
        self.cache.clear()
        self.requests = 0
        self.ok = 0
        self.by_status = {}
        self.faults = {}
        self.rate_limited = 0
        self.tokens_served = 0
        self.completions = 0
        self._reseed()

    def set_config(self, config: FakeConfig) -> None:
        """Swap the config live; the dice are re-seeded only if the seed changed."""
        old_seed = self.config.seed
        self.config = config
        if config.seed != old_seed:
            self._reseed()

    def _reseed(self) -> None:
        seed = self.config.seed
        self.planner = FaultPlanner(seed)
        self.jitter = Random(f"{seed}:jitter")

    def count(self, status: int) -> None:
        """Count one response by status."""
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def count_fault(self, kind: str) -> None:
        """Count one injected fault by kind."""
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def seen_prefix(self, key: int) -> bool:
        """Whether this first message was seen before; remembers it either way."""
        if key in self.cache:
            return True
        if len(self.cache) >= CACHE_CAP:
            self.cache.clear()
        self.cache.add(key)
        return False

    def remaining_tokens(self) -> int | None:
        """Budget left, or None without a budget."""
        budget = self.config.token_budget
        return None if budget is None else max(0, budget - self.tokens_served)

    def stats(self) -> dict[str, Any]:
        """The `/stats` document."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "faults": dict(sorted(self.faults.items())),
            "rate_limited": self.rate_limited,
            "tokens_served": self.tokens_served,
            "completions": self.completions,
            "in_flight": self.limiter.in_flight,
            "max_in_flight": self.limiter.max_in_flight,
            "logged": len(self.log),
        }

    def limits(self) -> Limits:
        """The ceilings of the current config (read per request, so live edits apply)."""
        config = self.config
        return Limits(
            config.rpm,
            config.tpm,
            config.max_concurrency,
            config.window,
            fixed=config.fixed_window,
            reset_headers=config.reset_headers,
        )

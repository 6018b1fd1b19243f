"""The fake's rate limiter: a window log for RPM and TPM, plus a concurrency cap.

Windows slide (an entry counts for `window` seconds after it was made) or are fixed (every
count resets at each multiple of `window`, as servers that reset on the minute). Tokens are
counted as OpenAI does (prompt + max_tokens when admitted) or on real usage (the prompt when
admitted, the completion when served: `book()`).

Every method takes `now`, so the arithmetic is testable without a clock; the server passes
`time.monotonic()`. Only admitted requests enter the log: a rejected request costs nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: Tokens charged for the answer when a request gives no max_tokens (as OpenAI counts).
DEFAULT_COMPLETION_CHARGE = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """The ceilings in force; None means unlimited."""

    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    window: float
    #: counts reset at every multiple of `window` rather than sliding
    fixed: bool = False
    #: reset fields (`x-ratelimit-reset-*`) in the rate headers
    reset_headers: bool = True

    @property
    def active(self) -> bool:
        """Whether any ceiling is set (if not, the limiter only counts in-flight requests)."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrency is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer for one request.

    `reason` is None when admitted, else "requests", "tokens" or "concurrency".
    `retry_after` is seconds until the request could fit (None for concurrency rejections,
    which DeepSeek answers without a delay).
    """

    admitted: bool
    reason: str | None = None
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


ADMITTED = Decision(admitted=True)


class RateLimiter:
    """Sliding-window RPM/TPM log and an in-flight counter.

    Not thread-safe: the server calls it only from its event loop.
    """

    def __init__(self) -> None:
        #: (when, tokens, requests): an admission counts one request, a served completion none
        self._log: deque[tuple[float, int, int]] = deque()
        self._tokens = 0
        self._requests = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def clear(self) -> None:
        """Forget the window (in-flight requests are real, so their count stays)."""
        self._log.clear()
        self._tokens = 0
        self._requests = 0
        self.max_in_flight = self.in_flight

    def admit(self, now: float, charge: int, limits: Limits, *, headers: bool) -> Decision:
        """Admit a request costing `charge` tokens, or say why not and for how long.

        An admitted request is counted in flight until `release()`.
        """
        if not limits.active:
            self._enter()
            return ADMITTED
        self._expire(now, limits)
        decision = self._refusal(now, charge, limits)
        if decision is None:
            self._log.append((now, charge, 1))
            self._tokens += charge
            self._requests += 1
            self._enter()
        out_headers = self._headers(now, limits) if headers else {}
        if decision is None:
            return Decision(admitted=True, headers=out_headers) if out_headers else ADMITTED
        return Decision(False, decision.reason, decision.retry_after, out_headers)

    def book(self, now: float, tokens: int, limits: Limits) -> None:
        """Count tokens served after admission (a completion, when TPM counts real usage)."""
        if limits.tpm is None or tokens <= 0:
            return
        self._expire(now, limits)
        self._log.append((now, tokens, 0))
        self._tokens += tokens

    def release(self) -> None:
        """Mark an admitted request as finished."""
        self.in_flight -= 1

    def _enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def _expire(self, now: float, limits: Limits) -> None:
        horizon = _window_start(now, limits.window) if limits.fixed else now - limits.window
        log = self._log
        while log and (log[0][0] < horizon if limits.fixed else log[0][0] <= horizon):
            _, tokens, requests = log.popleft()
            self._tokens -= tokens
            self._requests -= requests

    def _until_free(self, now: float, stamp: float, limits: Limits) -> float:
        """Seconds until an entry made at `stamp` stops counting."""
        if limits.fixed:
            return _window_start(now, limits.window) + limits.window - now
        return stamp + limits.window - now

    def _refusal(self, now: float, charge: int, limits: Limits) -> Decision | None:
        if limits.max_concurrency is not None and self.in_flight >= limits.max_concurrency:
            return Decision(False, "concurrency")
        if limits.rpm is not None and self._requests >= limits.rpm:
            # The request fits once enough of the oldest entries have left the window.
            stamps = [stamp for stamp, _, requests in self._log if requests]
            oldest = stamps[len(stamps) - limits.rpm]
            return Decision(False, "requests", self._until_free(now, oldest, limits))
        if limits.tpm is not None and self._tokens + charge > limits.tpm:
            return Decision(False, "tokens", self._wait_for_tokens(now, charge, limits))
        return None

    def _wait_for_tokens(self, now: float, charge: int, limits: Limits) -> float:
        assert limits.tpm is not None
        if charge > limits.tpm:
            # Never fits; tell the client to wait a full window (it should shrink max_tokens).
            return limits.window
        excess = self._tokens + charge - limits.tpm
        freed = 0
        for stamp, cost, _ in self._log:
            freed += cost
            if freed >= excess:
                return self._until_free(now, stamp, limits)
        return limits.window

    def _headers(self, now: float, limits: Limits) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the ceilings that are set.

        `reset` is the time until the oldest counted entry leaves the window, that is, until
        `remaining` next goes up ("0s" when the window is empty).
        """
        out: dict[str, str] = {}
        reset = go_duration(self._until_free(now, self._log[0][0], limits)) if self._log else "0s"
        if limits.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(limits.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - self._requests))
            if limits.reset_headers:
                out["x-ratelimit-reset-requests"] = reset
        if limits.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(limits.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - self._tokens))
            if limits.reset_headers:
                out["x-ratelimit-reset-tokens"] = reset
        return out


def _window_start(now: float, window: float) -> float:
    """The start of the fixed window holding `now` (windows start at multiples of `window`)."""
    return (now // window) * window


def go_duration(seconds: float) -> str:
    """Format like Go's `time.Duration.String()`, to the millisecond: `850ms`, `1.5s`, `6m0s`."""
    millis = round(seconds * 1000)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"

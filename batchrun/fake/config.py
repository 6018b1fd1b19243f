"""The fake server's knobs: one mutable dataclass, validated when built.

Standard library only, so the click command can describe it without pulling in aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

UsageChunk = Literal["final", "separate"]
#: what `usage` answers carry: all of DeepSeek's fields, no cache split and no completion
#: details (as some resellers), or no `usage` at all (as proxies that strip it)
UsageMode = Literal["full", "no_cache", "omit"]
#: how TPM is counted: prompt + max_tokens on admission (OpenAI), or the prompt on admission
#: and the completion when served (proxies counting real usage)
TpmCounts = Literal["max_tokens", "usage"]
#: what a rate-limit 429 says about when to come back: Retry-After (and retry-after-ms), only
#: a vendor header (`llm_provider-retry-after`, as LiteLLM), or nothing
LimitRetry = Literal["standard", "vendor", "none"]

#: Every fault kind the server can inject, randomly or through a `[[fault:KIND]]` marker.
KNOWN_FAULTS = frozenset(
    {
        "400",
        "404",
        "422",
        "429",
        "500",
        "502",
        "503",
        "504",
        "drop",
        "blank",
        "keepalive",
        "truncated",
        "isr",
    }
)
DEFAULT_FAULTS = ("429", "500", "503", "drop", "blank", "keepalive")


@dataclass
class FakeConfig:
    """How the fake behaves: latency, injected faults, auth, budget, rate limits, streaming.

    Build a new one (or use `FakeServer.update`) rather than assigning fields, so that the
    values are validated.
    """

    latency: float = 0.0
    latency_jitter: float = 0.0
    fail_rate: float = 0.0
    faults: tuple[str, ...] = DEFAULT_FAULTS
    seed: int = 0
    retry_after: float = 1.0
    api_key: str | None = None
    token_budget: int | None = None
    keepalive_lines: int = 3
    keepalive_interval: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    window: float = 60.0
    rate_headers: bool = True
    #: rate headers carry x-ratelimit-reset-* (some proxies send limit and remaining only)
    reset_headers: bool = True
    tpm_counts: TpmCounts = "max_tokens"
    #: counts reset at every multiple of `window` (on the minute) rather than sliding
    fixed_window: bool = False
    limit_retry: LimitRetry = "standard"
    usage_chunk: UsageChunk = "final"
    usage: UsageMode = "full"
    #: repeat the request's Authorization header in the answer's id, content and reasoning
    echo_auth: bool = False
    #: gzip the body of every plain 200 answer (Content-Encoding: gzip)
    compress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.faults, str):
            # Convenience for the CLI and for hand-written configs: "429,500".
            self.faults = tuple(part.strip() for part in self.faults.split(",") if part.strip())
        else:
            self.faults = tuple(self.faults)
        _validate(self)

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values (for `/_fake/config`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _validate(config: FakeConfig) -> None:
    for name in ("latency", "latency_jitter", "retry_after", "keepalive_interval"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if not 0.0 <= config.fail_rate <= 1.0:
        raise ValueError(f"fail_rate must be in [0, 1], got {config.fail_rate!r}")
    unknown = sorted(set(config.faults) - KNOWN_FAULTS)
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(sorted(KNOWN_FAULTS))}")
    if config.fail_rate > 0 and not config.faults:
        raise ValueError("fail_rate > 0 needs at least one fault kind")
    if config.token_budget is not None and config.token_budget < 0:
        raise ValueError(f"token_budget must be >= 0, got {config.token_budget!r}")
    if config.keepalive_lines < 0:
        raise ValueError(f"keepalive_lines must be >= 0, got {config.keepalive_lines!r}")
    for name in ("rpm", "tpm", "max_concurrency"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
    if config.window <= 0:
        raise ValueError(f"window must be > 0, got {config.window!r}")
    if config.usage_chunk not in ("final", "separate"):
        raise ValueError(f"usage_chunk must be 'final' or 'separate', got {config.usage_chunk!r}")
    if config.tpm_counts not in ("max_tokens", "usage"):
        raise ValueError(f"tpm_counts must be 'max_tokens' or 'usage', got {config.tpm_counts!r}")
    if config.limit_retry not in ("standard", "vendor", "none"):
        raise ValueError(
            f"limit_retry must be 'standard', 'vendor' or 'none', got {config.limit_retry!r}"
        )
    if config.usage not in ("full", "no_cache", "omit"):
        raise ValueError(f"usage must be 'full', 'no_cache' or 'omit', got {config.usage!r}")

"""What DeepSeek's own endpoint serves today: its model names, the names it retired, the most a
model may answer, and its per-account concurrency limits (api-notes.md, "DeepSeek in 2026").

Pure and light (standard library only): the job model, token estimates and the runner read
these facts from here. Resellers keep serving the 2025 names, so the rules that depend on
DeepSeek's own endpoint (warnings, default ceilings) apply only to its URL (`is_deepseek`).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

#: the model a job uses when it names none: what DeepSeek serves today
CURRENT_MODEL = "deepseek-flash"
#: DeepSeek's own endpoint (it may be given with /v1 or not)
BASE_URL = "https://api.deepseek.com"
HOST = urlsplit(BASE_URL).hostname
#: DeepSeek-V4.1-Flash under its name and the legacy names it still accepts (and bills as Flash)
FLASH_NAMES = ("deepseek-flash", "deepseek-v4-flash", "deepseek-v4-flash-vision-exp")
PRO = "deepseek-v4-pro"
#: the models that think unless told `thinking = false`
THINKING_MODELS = frozenset({*FLASH_NAMES, PRO})
#: the most a current model may answer, reasoning included ("output up to 384K")
MAX_OUTPUT_TOKENS = 384 * 1024
#: requests in flight per account and model, beyond which DeepSeek answers 429 at once
CONCURRENCY_LIMITS = {**dict.fromkeys(FLASH_NAMES, 2500), PRO: 500}
#: names DeepSeek's own endpoint retired on 2026-07-24 -> what to use now
RETIRED_MODELS = {
    "deepseek-chat": "deepseek-flash with thinking = false",
    "deepseek-reasoner": "deepseek-flash (it thinks by default)",
}


def is_deepseek(base_url: str) -> bool:
    """Whether `base_url` is DeepSeek's own endpoint (not a reseller's)."""
    return (urlsplit(base_url).hostname or "").lower() == HOST


def retired(models: Iterable[str]) -> dict[str, str]:
    """The retired names among `models`, each with the current model to use instead."""
    return {model: RETIRED_MODELS[model] for model in sorted(set(models) & RETIRED_MODELS.keys())}


def concurrency_ceiling(models: Iterable[str]) -> int | None:
    """The documented concurrency limit a run over `models` may use, or None if none is known.

    A run keeps one concurrency limit for all its models (`ratelimit.LocalRateLimiter`), so a
    sweep over models takes the smallest of their limits: it never pushes any model past its
    own. Models without a documented limit do not lower it.
    """
    limits = [CONCURRENCY_LIMITS[m] for m in models if m in CONCURRENCY_LIMITS]
    return min(limits) if limits else None

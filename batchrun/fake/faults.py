"""Which request gets which fault: `[[fault:KIND*N@S]]` markers first, then the seeded dice.

The marker lets a test aim a fault at one exact row; the dice give realistic noise that is
still reproducible from `seed`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from random import Random

from batchrun.fake.config import KNOWN_FAULTS

#: `[[fault:KIND]]`, `[[fault:KIND*N]]`, `[[fault:KIND*always]]`, each optionally `@SECONDS`
#: (the Retry-After of a scripted 429), e.g. `[[fault:429*2@0.05]]`.
MARKER = re.compile(r"\[\[fault:([A-Za-z0-9_-]+)(?:\*(\d+|always))?(?:@(\d+(?:\.\d*)?))?\]\]")

#: Remember at most this many distinct marked prompts; beyond it, counts start over.
_MAX_SCRIPTS = 100_000


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault to inject; `retry_after` overrides the configured one for a 429."""

    kind: str
    retry_after: float | None = None
    scripted: bool = False


class UnknownFault(ValueError):
    """Raised when a marker names a fault kind the fake does not know."""


class FaultPlanner:
    """Decides, per admitted chat request, whether and how it fails."""

    def __init__(self, seed: int) -> None:
        self._rng = Random(seed)
        self._used: dict[str, int] = {}

    def pick(self, prompt: str, *, fail_rate: float, kinds: tuple[str, ...]) -> Fault | None:
        """The fault for a request whose last user message is `prompt`, or None.

        A marker faults the first N requests carrying that same last user message (N=1 by
        default, or always), whatever `fail_rate` is; later ones fall through to the dice.

        Raises:
            UnknownFault: the marker names an unknown kind (so a typo is not silently ignored).
        """
        if "[[fault:" in prompt:
            scripted = self._scripted(prompt)
            if scripted is not None:
                return scripted
        if fail_rate > 0 and self._rng.random() < fail_rate:
            return Fault(self._rng.choice(kinds))
        return None

    def _scripted(self, prompt: str) -> Fault | None:
        match = MARKER.search(prompt)
        if match is None:
            return None
        kind, times, delay = match.groups()
        if kind not in KNOWN_FAULTS:
            raise UnknownFault(f"unknown fault kind {kind!r} in marker {match.group(0)!r}")
        retry_after = float(delay) if delay is not None else None
        if times == "always":
            return Fault(kind, retry_after, scripted=True)
        limit = int(times) if times is not None else 1
        used = self._used.get(prompt, 0)
        if used >= limit:
            return None
        if len(self._used) >= _MAX_SCRIPTS:
            self._used.clear()
        self._used[prompt] = used + 1
        return Fault(kind, retry_after, scripted=True)

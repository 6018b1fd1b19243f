"""What the fake says and how it counts: deterministic answers, token estimates, cache hits.

Pure functions, so that a test can predict every answer and every usage number from the
request alone. Token counts use DeepSeek's rule of thumb (0.3 token per ASCII character,
0.6 per other character), kept in tenths of a token as integers so no float rounding creeps in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

#: Longest slice of the prompt echoed back; whole short prompts stay intact.
ECHO_LIMIT = 500
#: Tokens added per message for the chat template, as OpenAI-style counters do.
MESSAGE_OVERHEAD = 4
#: Cache hits are granted in blocks of this many tokens, like DeepSeek's disk cache.
CACHE_UNIT = 64

_NEGATIVE = re.compile(r"\b(?:not|bad)\b", re.IGNORECASE)


def tenths(text: str) -> int:
    """Estimated tokens of `text`, in tenths of a token (3 per ASCII char, 6 per other)."""
    if text.isascii():
        return 3 * len(text)
    ascii_chars = len(text.encode("ascii", "ignore"))
    return 3 * ascii_chars + 6 * (len(text) - ascii_chars)


def ceil_tokens(tenths_: int) -> int:
    """Whole tokens from tenths, rounding up."""
    return -(-tenths_ // 10)


def prompt_tokens(messages: list[dict[str, Any]]) -> tuple[int, int]:
    """The prompt's token estimate and the first message's, both rounded up.

    Each message costs its content plus `MESSAGE_OVERHEAD`; the prompt is at least 1 token.
    """
    total = 0
    first = 0
    for index, message in enumerate(messages):
        content = message.get("content")
        cost = (tenths(content) if isinstance(content, str) else 0) + 10 * MESSAGE_OVERHEAD
        if index == 0:
            first = cost
        total += cost
    return max(1, ceil_tokens(total)), ceil_tokens(first)


def cache_hit_tokens(prompt: int, first_message: int, *, seen_before: bool) -> int:
    """Tokens served from cache: the first message in whole 64-token blocks, if seen before."""
    if not seen_before:
        return 0
    return min(prompt, (first_message // CACHE_UNIT) * CACHE_UNIT)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The content of the last user message (or of the last message, if no user spoke)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    content = messages[-1].get("content")
    return content if isinstance(content, str) else ""


#: how the reasoning opens at each effort, so that a sweep over efforts shows in reasoning
#: tokens ("medium" and "xhigh" are "high", as DeepSeek takes them)
_THINKING = {"low": "briefly: ", "max": "thinking long and hard about: "}


def answer(
    prompt: str, *, json_mode: bool, reasoner: bool, effort: str | None = None
) -> tuple[str, str | None]:
    """The (content, reasoning_content) the fake gives to `prompt`.

    Content is `"echo: " + prompt`; in JSON mode it is a JSON object whose `label` is
    "negative" when the prompt contains the word "not" or "bad" (whole words, any case).
    Reasoning is `"thinking about: " + prompt`, shorter at effort "low", longer at "max".
    """
    echo = prompt[:ECHO_LIMIT]
    if json_mode:
        label = "negative" if _NEGATIVE.search(echo) else "positive"
        content = orjson.dumps({"label": label, "confidence": 0.9, "echo": echo}).decode()
    else:
        content = "echo: " + echo
    opening = _THINKING.get(effort or "high", "thinking about: ")
    reasoning = opening + echo if reasoner else None
    return content, reasoning


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer cut to fit `max_tokens`, with its token counts and finish reason."""

    content: str
    reasoning: str | None
    content_tokens: int
    reasoning_tokens: int
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        """Completion tokens include the reasoner's chain of thought, as DeepSeek bills it."""
        return self.content_tokens + self.reasoning_tokens


def fit(content: str, reasoning: str | None, max_tokens: int) -> Answer:
    """Cut the answer to `max_tokens` (reasoning first, as the reasoner spends it first).

    When cut, finish_reason is "length" and completion_tokens equals `max_tokens` exactly.
    """
    content_tokens = ceil_tokens(tenths(content))
    reasoning_tokens = ceil_tokens(tenths(reasoning)) if reasoning is not None else 0
    if content_tokens + reasoning_tokens <= max_tokens:
        return Answer(content, reasoning, content_tokens, reasoning_tokens, "stop")
    if reasoning is not None and reasoning_tokens >= max_tokens:
        return Answer("", _cut(reasoning, max_tokens), 0, max_tokens, "length")
    room = max_tokens - reasoning_tokens
    return Answer(_cut(content, room), reasoning, room, reasoning_tokens, "length")


def _cut(text: str, tokens: int) -> str:
    """The longest prefix of `text` whose estimate fits in `tokens`."""
    budget = 10 * tokens
    if text.isascii():
        return text[: budget // 3]
    spent = 0
    for index, char in enumerate(text):
        spent += 3 if char.isascii() else 6
        if spent > budget:
            return text[:index]
    return text


def pieces(text: str, size: int = 16) -> list[str]:
    """`text` in stream-sized pieces (no empty pieces)."""
    return [text[i : i + size] for i in range(0, len(text), size)]

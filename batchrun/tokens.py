"""Token estimates for budgeting. Pure, and replaceable by an exact tokenizer.

DeepSeek's rule of thumb: one English character is about 0.3 token, one Chinese character
about 0.6. Exact counts come back in `usage`; estimates only decide when a request may go.
"""

from __future__ import annotations

from typing import Any

ASCII_TOKENS_PER_CHAR = 0.3
OTHER_TOKENS_PER_CHAR = 0.6
#: role markers and separators that every message adds
TOKENS_PER_MESSAGE = 4
#: what a request may use for its answer when it sets no max_tokens (DeepSeek's defaults)
DEFAULT_COMPLETION_TOKENS = 4096
DEFAULT_REASONER_COMPLETION_TOKENS = 32768


def text_tokens(text: str) -> float:
    """Estimated tokens of one piece of text."""
    if text.isascii():
        return len(text) * ASCII_TOKENS_PER_CHAR
    other = sum(1 for char in text if ord(char) > 127)
    return (len(text) - other) * ASCII_TOKENS_PER_CHAR + other * OTHER_TOKENS_PER_CHAR


def prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a request body."""
    total = 0.0
    for message in body.get("messages") or ():
        total += TOKENS_PER_MESSAGE
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += text_tokens(content)
        elif isinstance(content, list):  # content parts
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += text_tokens(part["text"])
    return max(1, int(total + 0.999))


def completion_cap(body: dict[str, Any]) -> int:
    """The most completion tokens a request may use."""
    value = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(value, int) and value > 0:
        return value
    if "reasoner" in str(body.get("model", "")):
        return DEFAULT_REASONER_COMPLETION_TOKENS
    return DEFAULT_COMPLETION_TOKENS


def prompt_tokens_at_most(body: dict[str, Any]) -> int:
    """An upper bound on a request's prompt tokens: no token is shorter than one byte."""
    total = 0
    for message in body.get("messages") or ():
        total += TOKENS_PER_MESSAGE
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.encode("utf-8"))
        elif content is not None:
            total += len(str(content).encode("utf-8"))
    return max(1, total)

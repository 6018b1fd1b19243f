"""Token estimates for budgeting. Pure, and replaceable by an exact tokenizer.

DeepSeek's rule of thumb: one English character is about 0.3 token, one Chinese character
about 0.6. Exact counts come back in `usage`; estimates only decide when a request may go.
"""

from __future__ import annotations

import json
from typing import Any

from batchrun import deepseek

ASCII_TOKENS_PER_CHAR = 0.3
OTHER_TOKENS_PER_CHAR = 0.6
#: role markers and separators that every message adds
TOKENS_PER_MESSAGE = 4
#: what a request may use for its answer when it sets no max_tokens (DeepSeek's defaults)
DEFAULT_COMPLETION_TOKENS = 4096
DEFAULT_REASONER_COMPLETION_TOKENS = 32768
#: body fields the server writes into the prompt besides the messages (tool definitions and
#: JSON schemas are rendered into it, and billed as prompt tokens)
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "response_format")
#: the text a server wraps around those fields when it renders them (an allowance per field)
TOKENS_PER_PROMPT_FIELD = 64


def text_tokens(text: str) -> float:
    """Estimated tokens of one piece of text."""
    if text.isascii():  # O(1) in CPython: a flag of the string object
        return len(text) * ASCII_TOKENS_PER_CHAR
    # the characters past ASCII are the ones an ASCII encoding drops: counted in C, not by a
    # generator over every character
    other = len(text) - len(text.encode("ascii", "ignore"))
    return (len(text) - other) * ASCII_TOKENS_PER_CHAR + other * OTHER_TOKENS_PER_CHAR


def _utf8_length(text: str) -> int:
    """The UTF-8 length of text, without encoding it when it is ASCII (one byte a char)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


_PROMPT_FIELD_SET = frozenset(PROMPT_FIELDS)


def _prompt_fields(body: dict[str, Any]) -> list[str]:
    """The JSON text of each body field that goes into the prompt besides the messages."""
    if _PROMPT_FIELD_SET.isdisjoint(body):  # most bodies: a look at each key, in C
        return []
    return [
        json.dumps(body[name], ensure_ascii=False, separators=(",", ":"))
        for name in PROMPT_FIELDS
        if body.get(name) not in (None, "", [], {})
    ]


def prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a request body, tool and response schemas included."""
    return prompt_estimate(body)[0]


def prompt_estimate(body: dict[str, Any]) -> tuple[int, int]:
    """`prompt_tokens(body)` and `prompt_tokens_at_most(body)` in one pass over the messages
    (the meter needs both for every request), with no string made for a plain text message:
    an ASCII message's length gives both, summed once at the end (issue 12)."""
    total = 0.0
    most = 0
    for text in _prompt_fields(body):  # most bodies have none: a look at each key, in C
        total += text_tokens(text)
        most += TOKENS_PER_PROMPT_FIELD + _utf8_length(text)
    messages = body.get("messages") or ()
    count = 0
    ascii_chars = 0  # characters of ASCII text: one byte and 0.3 token each
    for message in messages:
        count += 1
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            if content.isascii():  # the common message
                ascii_chars += len(content)
            else:
                total += text_tokens(content)
                most += len(content.encode("utf-8"))
        elif content is not None:
            if isinstance(content, list):  # content parts
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += text_tokens(part["text"])
            most += _utf8_length(str(content))
    total += count * TOKENS_PER_MESSAGE + ascii_chars * ASCII_TOKENS_PER_CHAR
    most += count * TOKENS_PER_MESSAGE + ascii_chars
    return max(1, int(total + 0.999)), max(1, most)


def completion_cap(body: dict[str, Any]) -> int:
    """The most completion tokens a request may use.

    Without max_tokens, DeepSeek's current models may answer up to their documented maximum
    output (384K, reasoning included) whether or not they think: DeepSeek documents no
    smaller default for them, so a spend cap reserves that much for each such request.
    """
    value = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(value, int) and value > 0:
        return value
    model = body.get("model")
    if model in deepseek.THINKING_MODELS:
        return deepseek.MAX_OUTPUT_TOKENS
    if "reasoner" in str("" if model is None else model):
        return DEFAULT_REASONER_COMPLETION_TOKENS
    return DEFAULT_COMPLETION_TOKENS


def prompt_tokens_at_most(body: dict[str, Any]) -> int:
    """An upper bound on a request's prompt tokens: no token is shorter than one byte.

    Tool definitions and a `response_format` schema count too: the server renders them into
    the prompt, so a cap that left them out would not hold for a request with large schemas.
    """
    return prompt_estimate(body)[1]

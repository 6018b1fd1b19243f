"""Token estimates: the fast paths give the same figures as counting character by character."""

from __future__ import annotations

import pytest

from batchrun import tokens


def slow_text_tokens(text: str) -> float:
    """The estimate as first written: a look at every character."""
    other = sum(1 for char in text if ord(char) > 127)
    return (len(text) - other) * 0.3 + other * 0.6


TEXTS = [
    pytest.param("", id="empty"),
    pytest.param("Say something about 42.", id="ascii"),
    pytest.param("\x7f" * 3 + "abc", id="ascii-edge"),
    pytest.param("什么是光合作用？", id="chinese"),
    pytest.param("Translate: 你好, world — café 🙂\x80", id="mixed"),
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_estimate_equals_the_character_by_character_count(text: str) -> None:
    """ASCII and non-ASCII text give the estimate a character-by-character count gives."""
    assert tokens.text_tokens(text) == pytest.approx(slow_text_tokens(text), abs=1e-9)


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_bound_counts_utf8_bytes(text: str) -> None:
    """The prompt's upper bound counts each message's UTF-8 bytes, ASCII or not."""
    body = {"messages": [{"role": "user", "content": text}, {"role": "user", "content": [text]}]}
    expected = 2 * tokens.TOKENS_PER_MESSAGE + len(text.encode()) + len(str([text]).encode())
    assert tokens.prompt_tokens_at_most(body) == max(1, expected)

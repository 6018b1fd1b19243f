"""Parsing chat-completion streams: comments, data lines, usage, reasoning, [DONE]."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchrun.sse import StreamAccumulator, StreamBroken

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def chunk(
    content: str | None = None,
    *,
    reasoning: str | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
    index: int = 0,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    data: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "deepseek-chat",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}] if choices else [],
        "usage": usage,
    }
    return data


def event(data: dict[str, Any] | str) -> list[str]:
    """The lines of one SSE event: a data line and the blank line that ends it."""
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    return [f"data: {text}", ""]


def feed(lines: list[str]) -> StreamAccumulator:
    acc = StreamAccumulator()
    for line in lines:
        acc.feed_line(line)
    return acc


def test_content_joined_from_deltas() -> None:
    """Content deltas are joined in order."""
    acc = feed([*event(chunk("Hel")), *event(chunk("lo")), *event(chunk(" world"))])
    assert acc.content == "Hello world"


def test_no_content_is_none() -> None:
    """A stream with no content delta has content None, not an empty string."""
    acc = feed([*event(chunk(finish="stop")), *event("[DONE]")])
    assert acc.content is None
    assert acc.reasoning_content is None


def test_keep_alive_comments_ignored() -> None:
    """DeepSeek's `: keep-alive` comments change nothing."""
    acc = feed([": keep-alive", "", ": keep-alive", "", *event(chunk("a")), ": keep-alive"])
    assert acc.content == "a"


@pytest.mark.parametrize(
    "prefix",
    [pytest.param("data: ", id="with-space"), pytest.param("data:", id="without-space")],
)
def test_data_line_with_or_without_space(prefix: str) -> None:
    """`data:` is read the same with or without a following space."""
    acc = feed([prefix + orjson.dumps(chunk("x")).decode(), ""])
    assert acc.content == "x"


def test_only_one_leading_space_stripped() -> None:
    """Only the single space after `data:` is removed; content spaces stay."""
    acc = feed(["data: " + orjson.dumps(chunk("  two spaces")).decode(), ""])
    assert acc.content == "  two spaces"


def test_other_fields_ignored() -> None:
    """`event:`, `id:` and `retry:` lines carry nothing for chat completions."""
    acc = feed(["event: message", "id: 7", "retry: 1000", *event(chunk("a"))])
    assert acc.content == "a"


def test_multi_line_data_joined() -> None:
    """Several data lines in one event are joined with newlines before parsing."""
    text = orjson.dumps(chunk("a"), option=orjson.OPT_INDENT_2).decode()
    acc = feed([*(f"data: {part}" for part in text.splitlines()), ""])
    assert acc.content == "a"


def test_event_waits_for_blank_line() -> None:
    """An event is not parsed until the blank line that ends it."""
    acc = feed(["data: " + orjson.dumps(chunk("a")).decode()])
    assert acc.content is None


def test_finish_dispatches_last_event_without_blank_line() -> None:
    """finish() counts a last event that had no blank line."""
    acc = feed([*event(chunk("a")), "data: [DONE]"])
    acc.finish()
    assert acc.done


def test_usage_on_final_chunk_deepseek() -> None:
    """DeepSeek's usage on the chunk with finish_reason is kept."""
    acc = feed(
        [
            *event(chunk("a")),
            *event(chunk("b", finish="stop", usage=USAGE)),
            *event("[DONE]"),
        ]
    )
    assert acc.usage == USAGE
    assert acc.finish_reason == "stop"
    assert acc.content == "ab"


def test_usage_on_separate_last_chunk_openai() -> None:
    """OpenAI's usage on a last chunk with empty choices is kept."""
    acc = feed(
        [
            *event(chunk("a")),
            *event(chunk(finish="stop")),
            *event(chunk(usage=USAGE, choices=False)),
            *event("[DONE]"),
        ]
    )
    assert acc.usage == USAGE
    assert acc.finish_reason == "stop"
    assert acc.content == "a"


def test_usage_from_last_chunk_that_has_it() -> None:
    """When several chunks carry usage, the last one wins."""
    early = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    acc = feed(
        [
            *event(chunk("a", usage=early)),
            *event(chunk("b", usage=USAGE)),
            *event(chunk(finish="stop")),
        ]
    )
    assert acc.usage == USAGE


def test_null_usage_does_not_erase_earlier_usage() -> None:
    """A later chunk with usage null keeps the usage already seen."""
    acc = feed([*event(chunk("a", usage=USAGE)), *event(chunk("b", usage=None))])
    assert acc.usage == USAGE


def test_reasoning_deltas_collected_apart_from_content() -> None:
    """reasoning_content deltas are joined separately from content."""
    acc = feed(
        [
            *event(chunk(reasoning="Think")),
            *event(chunk(reasoning="ing.")),
            *event(chunk("Answer")),
        ]
    )
    assert acc.reasoning_content == "Thinking."
    assert acc.content == "Answer"


def test_id_and_model_recorded() -> None:
    """The response id and model come from the chunks."""
    acc = feed(event(chunk("a")))
    assert acc.response_id == "chatcmpl-1"
    assert acc.model == "deepseek-chat"


def test_other_choice_indexes_ignored() -> None:
    """Only choice 0 is collected."""
    acc = feed([*event(chunk("zero")), *event(chunk("one", index=1))])
    assert acc.content == "zero"


def test_done_marker_sets_done() -> None:
    """`data: [DONE]` marks the stream complete."""
    acc = feed([*event(chunk("a")), *event("[DONE]")])
    assert acc.done


def test_stream_without_done_is_not_done() -> None:
    """A stream that ends without [DONE] leaves done False, even after finish()."""
    acc = feed([*event(chunk("a", finish="stop", usage=USAGE))])
    acc.finish()
    assert not acc.done
    assert acc.content == "a"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("not json", id="text"),
        pytest.param('{"choices": [', id="truncated"),
    ],
)
def test_non_json_event_raises(data: str) -> None:
    """An event that is not JSON raises StreamBroken."""
    acc = StreamAccumulator()
    acc.feed_line(f"data: {data}")
    with pytest.raises(StreamBroken, match="not JSON"):
        acc.feed_line("")


def test_non_object_event_raises() -> None:
    """A JSON event that is not an object raises StreamBroken."""
    with pytest.raises(StreamBroken, match="not a JSON object"):
        feed(event("[1, 2]"))


def test_error_event_raises() -> None:
    """A chunk carrying an error raises StreamBroken with the error in the message."""
    with pytest.raises(StreamBroken, match="overloaded"):
        feed(event({"error": {"message": "overloaded", "type": "server_error"}}))


def test_blank_lines_without_data_do_nothing() -> None:
    """Blank lines with no pending data are not events."""
    acc = feed(["", "", ""])
    acc.finish()
    assert acc.content is None
    assert not acc.done

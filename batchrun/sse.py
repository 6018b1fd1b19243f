"""Pure parsing of chat-completion streams (server-sent events). No I/O.

DeepSeek sends `: keep-alive` comments while a request waits, `data: {chunk}` lines, usage on
the final chunk that carries `finish_reason` (OpenAI sends it on a separate last chunk with
empty `choices`), and `data: [DONE]`. Usage is taken from the last chunk whose usage is set.
"""

from __future__ import annotations

from typing import Any

import orjson


class StreamBroken(ValueError):
    """Raised when a stream carries something that is not a chunk."""


class StreamAccumulator:
    """Collects a streamed completion, one SSE line at a time."""

    __slots__ = (
        "_content",
        "_data",
        "_reasoning",
        "done",
        "finish_reason",
        "model",
        "response_id",
        "usage",
    )

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._data: list[str] = []
        self.done = False
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.usage: dict[str, Any] | None = None

    @property
    def content(self) -> str | None:
        return "".join(self._content) if self._content else None

    @property
    def reasoning_content(self) -> str | None:
        return "".join(self._reasoning) if self._reasoning else None

    def feed_line(self, line: str) -> None:
        """Take one line of the stream (without its line ending)."""
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            return  # a comment, such as DeepSeek's keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        # other fields (event, id, retry) carry nothing for chat completions

    def finish(self) -> None:
        """Mark the end of the byte stream: a last event without a blank line still counts."""
        self._dispatch()

    def _dispatch(self) -> None:
        if not self._data:
            return
        data = "\n".join(self._data)
        self._data.clear()
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamBroken(f"a stream event is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamBroken("a stream event is not a JSON object")
        self._take(chunk)

    def _take(self, chunk: dict[str, Any]) -> None:
        if chunk.get("error"):
            raise StreamBroken(f"the stream carried an error: {chunk['error']}")
        self.response_id = chunk.get("id") or self.response_id
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._content.append(delta["content"])
            if delta.get("reasoning_content"):
                self._reasoning.append(delta["reasoning_content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

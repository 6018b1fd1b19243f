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
        if isinstance(chunk.get("id"), str):
            self.response_id = chunk["id"]
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if choices is None:
            choices = []
        if not isinstance(choices, list):
            raise StreamBroken("a stream chunk's choices is not a list")
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str) and delta["content"]:
                    self._content.append(delta["content"])
                reasoning = delta.get("reasoning_content")
                if isinstance(reasoning, str) and reasoning:
                    self._reasoning.append(reasoning)
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]

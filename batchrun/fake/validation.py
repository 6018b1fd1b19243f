"""Request checks in the order and with the statuses the real API uses (400, or 422 for ranges).

Pure: a parsed JSON body in, a `ChatRequest` or an `Invalid` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

ROLES = frozenset({"system", "user", "assistant", "tool"})
CHAT_MAX_TOKENS = 8192
REASONER_MAX_TOKENS = 65536
CONTEXT_LENGTH = 131072
#: max_tokens used for truncation when the request gives none (DeepSeek's defaults).
CHAT_DEFAULT_MAX_TOKENS = 4096
REASONER_DEFAULT_MAX_TOKENS = 32768
#: the 2025 models, which resellers still serve
LEGACY_MODELS = ("deepseek-chat", "deepseek-reasoner")
#: what DeepSeek serves today (V4.1-Flash under three names, and V4-Pro): they think unless
#: the body says `"thinking": {"type": "disabled"}`
CURRENT_MODELS = (
    "deepseek-flash",
    "deepseek-v4-flash",
    "deepseek-v4-flash-vision-exp",
    "deepseek-v4-pro",
)
#: the current models' output bound ("up to 384K") and context (1M)
CURRENT_MAX_TOKENS = 393216
CURRENT_CONTEXT_LENGTH = 1048576
#: efforts DeepSeek takes ("medium" and "xhigh" are taken as "high")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
_USER_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a request is refused, with the status to send."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a valid chat request the fake acts on."""

    model: str
    messages: list[dict[str, Any]]
    #: the answer carries reasoning_content (and reasoning tokens)
    reasoner: bool
    max_tokens: int | None
    stream: bool
    include_usage: bool
    json_mode: bool
    #: the body's reasoning_effort, if any
    effort: str | None = None

    @property
    def current(self) -> bool:
        """Whether the model is one DeepSeek serves today (1M context, 384K output)."""
        return self.model in CURRENT_MODELS

    @property
    def effective_max_tokens(self) -> int:
        """The cap the answer is cut to: the request's, else the model's default."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.current:
            return CURRENT_MAX_TOKENS
        return REASONER_DEFAULT_MAX_TOKENS if self.reasoner else CHAT_DEFAULT_MAX_TOKENS

    @property
    def context_length(self) -> int:
        return CURRENT_CONTEXT_LENGTH if self.current else CONTEXT_LENGTH


def known_model(model: str) -> bool:
    """DeepSeek's models of today and of 2025, plus any `fake-*` name for resellers' ids."""
    return model in CURRENT_MODELS or model in LEGACY_MODELS or model.startswith("fake-")


def _thinking(body: dict[str, Any]) -> bool | Invalid | None:
    """The body's thinking switch (None: not given), or why it is refused (400, as a body
    DeepSeek cannot deserialize)."""
    value = body.get("thinking")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("enabled", "disabled"):
        return Invalid(
            400,
            "Failed to deserialize the JSON body into the target type: thinking: expected "
            f'{{"type": "enabled"}} or {{"type": "disabled"}}, got {orjson.dumps(value).decode()}',
        )
    return bool(kind == "enabled")


def _other_fields(body: dict[str, Any]) -> Invalid | None:
    """`reasoning_effort` (422 for a value out of its set) and `user_id` (400)."""
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        return Invalid(
            422, f"Invalid reasoning_effort value {effort!r}, expected one of {list(EFFORTS)}"
        )
    user_id = body.get("user_id")
    if user_id is not None and (
        not isinstance(user_id, str)
        or not 1 <= len(user_id) <= 512
        or not set(user_id) <= _USER_ID_CHARS
    ):
        return Invalid(400, "Invalid user_id: 1 to 512 characters of [a-zA-Z0-9_-]")
    return None


def parse_chat(body: object) -> ChatRequest | Invalid:
    """Validate a chat-completions body like the real API does."""
    if not isinstance(body, dict):
        return Invalid(400, "Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        return Invalid(400, "Missing or invalid field: model")
    messages = body.get("messages")
    problem = _check_messages(messages)
    if problem is not None:
        return Invalid(400, problem)
    assert isinstance(messages, list)  # checked above; narrows for mypy
    if not known_model(model):
        return Invalid(400, "Model Not Exist")
    thinking = _thinking(body)
    if isinstance(thinking, Invalid):
        return thinking
    problem_field = _other_fields(body)
    if problem_field is not None:
        return problem_field
    if model in CURRENT_MODELS:
        reasoner = thinking is not False
        limit = CURRENT_MAX_TOKENS
    else:  # the 2025 models pay no heed to `thinking`
        reasoner = model == "deepseek-reasoner" or (
            model.startswith("fake-") and "reasoner" in model
        )
        limit = REASONER_MAX_TOKENS if reasoner else CHAT_MAX_TOKENS

    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not 1 <= max_tokens <= limit
    ):
        return Invalid(
            400, f"Invalid max_tokens value, the valid range of max_tokens is [1, {limit}]"
        )

    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not 0 <= temperature <= 2
    ):
        return Invalid(422, "Invalid temperature value, the valid range of temperature is [0, 2]")

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return Invalid(400, "Invalid field: stream must be a boolean")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    response_format = body.get("response_format")
    json_mode = False
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object"):
            return Invalid(400, "Invalid response_format: type must be 'text' or 'json_object'")
        json_mode = kind == "json_object"

    return ChatRequest(
        model=model,
        messages=messages,
        reasoner=reasoner,
        max_tokens=max_tokens,
        stream=bool(stream),
        include_usage=include_usage,
        json_mode=json_mode,
        effort=body.get("reasoning_effort"),
    )


def _check_messages(messages: object) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "Missing or empty field: messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] must be an object"
        role = message.get("role")
        if role not in ROLES:
            return f"messages[{index}]: unknown variant {role!r}, expected one of {sorted(ROLES)}"
        content = message.get("content")
        # An assistant turn that only called tools has null content.
        if not isinstance(content, str) and not (role == "assistant" and content is None):
            return f"messages[{index}].content must be a string"
    return None


def context_overflow(prompt_tokens: int, request: ChatRequest) -> Invalid | None:
    """The 400 the real API sends when prompt plus max_tokens exceeds the context."""
    context = request.context_length
    if prompt_tokens + request.effective_max_tokens <= context:
        return None
    return Invalid(
        400,
        f"This model's maximum context length is {context} tokens. However, you "
        f"requested {prompt_tokens + request.effective_max_tokens} tokens "
        f"({prompt_tokens} in the messages, {request.effective_max_tokens} in the completion).",
    )

"""The wire shapes the fake sends: completions, stream chunks, errors, models, balance.

Kept in one place so the shapes can be compared with api-notes.md at a glance.
"""

from __future__ import annotations

import math
from typing import Any

from batchrun.fake.content import Answer, pieces
from batchrun.fake.validation import CURRENT_MODELS, LEGACY_MODELS

SYSTEM_FINGERPRINT = "fp_fake_batchrun"
#: today's models, then the 2025 ones that resellers still serve
MODELS = (*CURRENT_MODELS, *LEGACY_MODELS)

#: (type, code) of the OpenAI-style error body for each status the fake sends.
ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "invalid_request_error"),
    402: ("unknown_error", "invalid_request_error"),
    404: ("invalid_request_error", "not_found"),
    422: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    504: ("server_error", "gateway_timeout"),
}

HTML_503 = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"


def error(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`."""
    type_, code = ERROR_KINDS.get(status, ("server_error", "server_error"))
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def usage(prompt_tokens: int, hit_tokens: int, answer: Answer) -> dict[str, Any]:
    """DeepSeek's usage block; `prompt_tokens = hit + miss` by construction."""
    completion = answer.completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": hit_tokens},
        "prompt_cache_hit_tokens": hit_tokens,
        "prompt_cache_miss_tokens": prompt_tokens - hit_tokens,
        "completion_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
    }


#: the fields a reseller without a cache split leaves out of `usage`
_CACHE_FIELDS = (
    "prompt_tokens_details",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "completion_tokens_details",
)


def reported_usage(usage_: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """The usage block as the configured server reports it: whole, without the cache split
    and details (`no_cache`), or not at all (`omit`)."""
    if mode == "omit":
        return None
    if mode == "no_cache":
        return {k: v for k, v in usage_.items() if k not in _CACHE_FIELDS}
    return usage_


def completion(
    *, id_: str, created: int, model: str, answer: Answer, usage_: dict[str, Any] | None
) -> dict[str, Any]:
    """A non-streaming `chat.completion` object."""
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer.content,
                    "reasoning_content": answer.reasoning,
                },
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        **({"usage": usage_} if usage_ is not None else {}),
    }


def chunks(
    *,
    id_: str,
    created: int,
    model: str,
    answer: Answer,
    usage_: dict[str, Any] | None,
    usage_chunk: str,
    include_usage: bool,
    piece_size: int = 16,
) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a stream, in order, without `[DONE]`.

    Role first, then reasoning pieces (reasoner only), then content pieces, then a chunk
    carrying `finish_reason`. With `usage_chunk="final"` (DeepSeek) usage rides on that chunk;
    with `"separate"` (OpenAI) it comes in one more chunk with empty `choices`, and only when
    the client asked for it with `stream_options.include_usage`.
    """
    reasoner = answer.reasoning is not None

    def chunk(
        delta: dict[str, Any], finish: str | None = None, use: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "id": id_,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": use,
        }

    if reasoner:
        out = [chunk({"role": "assistant", "content": None, "reasoning_content": ""})]
        for part in pieces(answer.reasoning or "", piece_size):
            out.append(chunk({"content": None, "reasoning_content": part}))
        for part in pieces(answer.content, piece_size):
            out.append(chunk({"content": part, "reasoning_content": None}))
    else:
        out = [chunk({"role": "assistant", "content": ""})]
        for part in pieces(answer.content, piece_size):
            out.append(chunk({"content": part}))
    final_usage = usage_ if usage_chunk == "final" else None
    out.append(chunk({"content": ""}, answer.finish_reason, final_usage))
    if usage_chunk == "separate" and include_usage and usage_ is not None:
        last = chunk({})
        last["choices"] = []
        last["usage"] = usage_
        out.append(last)
    return out


def models() -> dict[str, Any]:
    """The `/models` list."""
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "owned_by": "deepseek"} for name in MODELS],
    }


def balance(remaining_tokens: int | None) -> dict[str, Any]:
    """DeepSeek's `/user/balance` shape.

    Without a token budget the balance is a fixed 110.00 CNY. With one, the balance is the
    remaining budget at 1 CNY per 1,000 tokens, and `fake_remaining_tokens` gives it exactly.
    """
    if remaining_tokens is None:
        info = {
            "currency": "CNY",
            "total_balance": "110.00",
            "granted_balance": "10.00",
            "topped_up_balance": "100.00",
        }
        return {"is_available": True, "balance_infos": [info]}
    amount = f"{remaining_tokens / 1000:.2f}"
    info = {
        "currency": "CNY",
        "total_balance": amount,
        "granted_balance": "0.00",
        "topped_up_balance": amount,
    }
    return {
        "is_available": remaining_tokens > 0,
        "balance_infos": [info],
        "fake_remaining_tokens": remaining_tokens,
    }


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds, rounded up, plus `retry-after-ms` when not whole.

    Rounding up keeps the integer header honest ("not before"); clients that read
    `retry-after-ms` (as the OpenAI SDK does) get the exact delay.
    """
    seconds = max(0.0, seconds)
    whole = math.ceil(seconds)
    headers = {"Retry-After": str(whole)}
    if whole != seconds:
        headers["retry-after-ms"] = str(round(seconds * 1000))
    return headers

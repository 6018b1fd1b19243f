"""The aiohttp app: routes and handlers of the fake API.

A chat request goes through, in order: auth (401), JSON and field checks (400/422), the token
budget (402), the rate limiter (429, counted in `rate_limited`), then the fault planner, the
latency, and the answer. Only requests the limiter admitted consume scripted faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip as gzip_module
import hmac
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from batchrun.fake import bodies, content
from batchrun.fake.config import FakeConfig
from batchrun.fake.content import Answer
from batchrun.fake.faults import Fault, UnknownFault
from batchrun.fake.limits import DEFAULT_COMPLETION_CHARGE
from batchrun.fake.state import FakeState
from batchrun.fake.validation import ChatRequest, Invalid, context_overflow, parse_chat

STATE = web.AppKey("state", FakeState)
#: Faults answered with an OpenAI-style JSON error of that status.
_ERROR_FAULTS = frozenset({"400", "404", "422", "500", "502", "504"})
_FAULT_MESSAGES = {
    "400": "Invalid request (injected by the fake)",
    "404": "Not Found (injected by the fake)",
    "422": "Invalid parameters (injected by the fake)",
    "429": "Rate Limit Reached (injected by the fake)",
    "500": "Internal Server Error (injected by the fake)",
    "502": "Bad Gateway (injected by the fake)",
    "504": "Gateway Timeout (injected by the fake)",
}
_LIMIT_MESSAGES = {
    "requests": "Rate limit reached for requests per minute",
    "tokens": "Rate limit reached for tokens per minute",
    "concurrency": "Rate Limit Reached: too many concurrent requests",
}


def make_app(state: FakeState) -> web.Application:
    """The fake's routes, bound to `state`."""
    app = web.Application()
    app[STATE] = state
    for prefix in ("", "/v1"):
        app.router.add_post(prefix + "/chat/completions", _chat)
        app.router.add_get(prefix + "/models", _models)
        app.router.add_get(prefix + "/user/balance", _balance)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/_fake/requests", _logged)
    app.router.add_post("/_fake/reset", _reset)
    app.router.add_get("/_fake/config", _config)
    app.router.add_post("/_fake/config", _config)
    return app


# --- small response helpers ------------------------------------------------------------------


def _json(
    status: int, payload: Any, headers: dict[str, str] | None = None, *, gzip: bool = False
) -> web.Response:
    out = {"Content-Type": "application/json"}
    if headers:
        out.update(headers)
    body = orjson.dumps(payload)
    if gzip:  # as a server compressing its answers does (`compress`)
        body = gzip_module.compress(body)
        out["Content-Encoding"] = "gzip"
    return web.Response(status=status, body=body, headers=out)


def _error(
    state: FakeState, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    state.count(status)
    return _json(status, bodies.error(status, message), headers)


def _authorized(request: web.Request, api_key: str) -> bool:
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _unauthorized(state: FakeState, request: web.Request) -> web.Response:
    # some proxies echo the key they were given: the client must keep it out of its logs
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    shown = f" (key provided: {given})" if given else ""
    return _error(state, 401, f"Authentication Fails, Your api key is invalid{shown}")


# --- chat completions ------------------------------------------------------------------------


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    state.requests += 1
    if config.api_key is not None and not _authorized(request, config.api_key):
        return _unauthorized(state, request)
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(state, 400, "Failed to deserialize the JSON body into the target type")
    if isinstance(body, dict):
        state.log.append(body)
    chat = parse_chat(body)
    if isinstance(chat, Invalid):
        return _error(state, chat.status, chat.message)
    prompt_tokens, first_tokens = content.prompt_tokens(chat.messages)
    overflow = context_overflow(prompt_tokens, chat)
    if overflow is not None:
        return _error(state, overflow.status, overflow.message)
    remaining = state.remaining_tokens()
    if remaining is not None and remaining <= 0:
        return _error(state, 402, "Insufficient Balance")

    charge = prompt_tokens
    if config.tpm_counts == "max_tokens":
        charge += chat.max_tokens or DEFAULT_COMPLETION_CHARGE
    decision = state.limiter.admit(
        time.monotonic(), charge, state.limits(), headers=config.rate_headers
    )
    headers = decision.headers
    if not decision.admitted:
        state.rate_limited += 1
        if decision.retry_after is not None and config.limit_retry == "standard":
            headers = {**headers, **bodies.retry_after_headers(decision.retry_after)}
        elif decision.retry_after is not None and config.limit_retry == "vendor":
            vendor = str(math.ceil(decision.retry_after))
            headers = {**headers, "llm_provider-retry-after": vendor}
        return _error(state, 429, _LIMIT_MESSAGES[decision.reason or "requests"], headers)
    try:
        return await _admitted(request, state, config, chat, prompt_tokens, first_tokens, headers)
    finally:
        state.limiter.release()


async def _admitted(
    request: web.Request,
    state: FakeState,
    config: FakeConfig,
    chat: ChatRequest,
    prompt_tokens: int,
    first_tokens: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    prompt = content.last_user_text(chat.messages)
    try:
        fault = state.planner.pick(prompt, fail_rate=config.fail_rate, kinds=config.faults)
    except UnknownFault as exc:
        return _error(state, 400, str(exc), headers)
    delay = config.latency
    if config.latency_jitter:
        delay += state.jitter.uniform(0.0, config.latency_jitter)

    echo = request.headers.get("Authorization", "") if config.echo_auth else None

    def build(*, isr: bool = False) -> tuple[dict[str, Any], Answer, dict[str, Any] | None]:
        return _completion(state, chat, prompt, prompt_tokens, first_tokens, isr=isr, echo=echo)

    if fault is not None:
        state.count_fault(fault.kind)
        if fault.kind == "keepalive":
            return await _keepalive(request, state, config, chat, build, delay, headers)
    if delay > 0:
        await asyncio.sleep(delay)
    if fault is not None:
        return await _inject(request, state, config, chat, fault, build, headers)
    if chat.stream:
        return await _stream(request, state, chat, build(), config, headers)
    payload, _, _ = build()
    state.count(200)
    state.ok += 1
    return _json(200, payload, headers, gzip=config.compress)


def _completion(
    state: FakeState,
    chat: ChatRequest,
    prompt: str,
    prompt_tokens: int,
    first_tokens: int,
    *,
    isr: bool = False,
    echo: str | None = None,
) -> tuple[dict[str, Any], Answer, dict[str, Any] | None]:
    """Build the answer and its usage, and book the tokens and the cached prefix.

    With `echo` (the request's Authorization header, in `echo_auth` mode) the answer's id,
    content and reasoning repeat it, as a careless proxy might.
    """
    if isr:
        answer = Answer("", "" if chat.reasoner else None, 0, 0, "insufficient_system_resource")
    else:
        text, reasoning = content.answer(
            prompt, json_mode=chat.json_mode, reasoner=chat.reasoner, effort=chat.effort
        )
        answer = content.fit(text, reasoning, chat.effective_max_tokens)
    if echo is not None:
        answer = dataclasses.replace(
            answer,
            content=f"{answer.content} (you sent {echo})",
            reasoning=f"{answer.reasoning or ''} (you sent {echo})",
        )
    first = chat.messages[0]
    seen = state.seen_prefix(hash((first.get("role"), first.get("content"))))
    hit = content.cache_hit_tokens(prompt_tokens, first_tokens, seen_before=seen)
    usage = bodies.usage(prompt_tokens, hit, answer)
    state.tokens_served += usage["total_tokens"]
    state.completions += 1
    if state.config.tpm_counts == "usage":  # the completion counts against TPM when served
        state.limiter.book(time.monotonic(), usage["completion_tokens"], state.limits())
    reported = bodies.reported_usage(usage, state.config.usage)
    payload = bodies.completion(
        id_=f"{uuid.uuid4()} {echo}" if echo is not None else str(uuid.uuid4()),
        created=int(time.time()),
        model=chat.model,
        answer=answer,
        usage_=reported,
    )
    return payload, answer, reported


_Build = Callable[..., tuple[dict[str, Any], Answer, dict[str, Any] | None]]


async def _inject(
    request: web.Request,
    state: FakeState,
    config: FakeConfig,
    chat: ChatRequest,
    fault: Fault,
    build: _Build,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Answer with the fault `fault` (all kinds but keepalive, which needs the wait)."""
    kind = fault.kind
    if kind in _ERROR_FAULTS:
        return _error(state, int(kind), _FAULT_MESSAGES[kind], headers)
    if kind == "429":
        delay = fault.retry_after if fault.retry_after is not None else config.retry_after
        retry = {**headers, **bodies.retry_after_headers(delay)}
        return _error(state, 429, _FAULT_MESSAGES["429"], retry)
    if kind == "503":
        state.count(503)
        html = {"Content-Type": "text/html", **headers}
        return web.Response(status=503, body=bodies.HTML_503, headers=html)
    if kind == "drop":
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Never sent: aiohttp sees the closed transport and gives up quietly.
        return web.Response(status=500)
    if kind == "blank":
        state.count(200)
        kind_type = "text/event-stream" if chat.stream else "application/json"
        return web.Response(body=b"\n\n\n", headers={"Content-Type": kind_type, **headers})
    if kind == "isr":
        if chat.stream:
            return await _stream(request, state, chat, build(isr=True), config, headers, ok=False)
        payload, _, _ = build(isr=True)
        state.count(200)
        return _json(200, payload, headers)
    if kind == "truncated":
        if chat.stream:
            return await _stream(request, state, chat, build(), config, headers, truncate=True)
        payload, _, _ = build()
        data = orjson.dumps(payload)
        state.count(200)
        cut = {"Content-Type": "application/json", **headers}
        return web.Response(body=data[: len(data) // 2], headers=cut)
    raise AssertionError(f"unhandled fault kind {kind!r}")  # config validation prevents this


async def _keepalive(
    request: web.Request,
    state: FakeState,
    config: FakeConfig,
    chat: ChatRequest,
    build: _Build,
    delay: float,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send blank lines (or `: keep-alive` SSE comments) while "waiting", then the answer.

    Chunked, so each line leaves before the body exists, as DeepSeek does under load.
    """
    kind = "text/event-stream" if chat.stream else "application/json"
    response = web.StreamResponse(headers={"Content-Type": kind, **headers})
    line = b": keep-alive\n\n" if chat.stream else b"\n"
    state.count(200)
    state.ok += 1
    try:
        await response.prepare(request)
        for index in range(config.keepalive_lines):
            if index and config.keepalive_interval > 0:
                await asyncio.sleep(config.keepalive_interval)
            await response.write(line)
        if delay > 0:
            await asyncio.sleep(delay)
        payload, answer, usage = build()
        if chat.stream:
            await _write_events(response, chat, payload, answer, usage, config)
        else:
            await response.write(orjson.dumps(payload))
        await response.write_eof()
    except ConnectionError:
        pass  # the client left; nothing to tell it
    return response


async def _stream(
    request: web.Request,
    state: FakeState,
    chat: ChatRequest,
    built: tuple[dict[str, Any], Answer, dict[str, Any] | None],
    config: FakeConfig,
    headers: dict[str, str],
    *,
    ok: bool = True,
    truncate: bool = False,
) -> web.StreamResponse:
    """Send the answer as SSE; `truncate` stops halfway, before `finish_reason` and [DONE]."""
    payload, answer, usage = built
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    state.count(200)
    if ok and not truncate:
        state.ok += 1
    try:
        await response.prepare(request)
        await _write_events(response, chat, payload, answer, usage, config, truncate=truncate)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left mid-stream
    return response


async def _write_events(
    response: web.StreamResponse,
    chat: ChatRequest,
    payload: dict[str, Any],
    answer: Answer,
    usage: dict[str, Any] | None,
    config: FakeConfig,
    *,
    truncate: bool = False,
) -> None:
    events = bodies.chunks(
        id_=payload["id"],
        created=payload["created"],
        model=chat.model,
        answer=answer,
        usage_=usage,
        usage_chunk=config.usage_chunk,
        include_usage=chat.include_usage,
    )
    if truncate:
        # Only the role and content chunks before the one with finish_reason, half of them.
        before_final = events[: -2 if events[-1]["choices"] == [] else -1]
        events = before_final[: max(1, len(before_final) // 2)]
    for event in events:
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
    if not truncate:
        await response.write(b"data: [DONE]\n\n")


# --- other endpoints -------------------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    api_key = state.config.api_key
    if api_key is not None and not _authorized(request, api_key):
        return _unauthorized(state, request)
    return _json(200, bodies.models())


async def _balance(request: web.Request) -> web.Response:
    state = request.app[STATE]
    api_key = state.config.api_key
    if api_key is not None and not _authorized(request, api_key):
        return _unauthorized(state, request)
    return _json(200, bodies.balance(state.remaining_tokens()))


async def _stats(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].stats())


async def _logged(request: web.Request) -> web.Response:
    return _json(200, list(request.app[STATE].log))


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json(200, {"reset": True})


async def _config(request: web.Request) -> web.Response:
    """GET shows the config; POST a JSON object of fields to change them live."""
    state = request.app[STATE]
    if request.method == "POST":
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object of config fields")
            if "faults" in changes and isinstance(changes["faults"], list):
                changes["faults"] = tuple(changes["faults"])
            state.set_config(dataclasses.replace(state.config, **changes))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return _json(400, bodies.error(400, f"invalid config change: {exc}"))
    return _json(200, state.config.as_dict())

"""The fake DeepSeek-compatible server, driven over real HTTP with httpx on 127.0.0.1."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner

from batchrun.fake import FakeConfig, FakeServer, fake_server_command
from batchrun.fake.limits import Limits, RateLimiter, go_duration


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig()) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeServer) -> None:
    fake.reset(FakeConfig())


@pytest.fixture(scope="module")
def client(fake: FakeServer) -> Iterator[httpx.Client]:
    # Module-scoped: building a client's TLS context costs ~50 ms, a test's whole budget.
    with httpx.Client(base_url=fake.base_url, timeout=5.0) as http:
        yield http


def body(prompt: str = "hello", model: str = "deepseek-chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


def chat(client: httpx.Client, prompt: str = "hello", **extra: Any) -> httpx.Response:
    return client.post("/chat/completions", json=body(prompt, **extra))


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body into chunk dicts, with the string "[DONE]" for the end marker."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


# --- answers ---------------------------------------------------------------------------------


def test_completion_has_deepseek_shape(client: httpx.Client) -> None:
    """A plain request gets a chat.completion with every field api-notes.md lists."""
    response = chat(client)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert set(data) == {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    }
    assert data["object"] == "chat.completion"
    assert data["model"] == "deepseek-chat"
    assert isinstance(data["created"], int)
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello", "reasoning_content": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]


def test_each_answer_echoes_its_own_prompt(client: httpx.Client) -> None:
    """Content is "echo: " + the last user message, so rows can be matched to prompts."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "row 17: déjà vu"},
    ]
    response = client.post("/chat/completions", json={"model": "fake-x", "messages": messages})
    assert response.json()["choices"][0]["message"]["content"] == "echo: row 17: déjà vu"
    assert chat(client, "row 18").json()["choices"][0]["message"]["content"] == "echo: row 18"


def test_v1_prefix_is_served(client: httpx.Client) -> None:
    """Base URLs ending in /v1 work too."""
    assert client.post("/v1/chat/completions", json=body()).status_code == 200


@pytest.mark.parametrize(
    ("prompt", "label"),
    [
        pytest.param("great product", "positive", id="positive"),
        pytest.param("this is NOT good", "negative", id="not"),
        pytest.param("bad value", "negative", id="bad"),
    ],
)
def test_json_mode_answers_a_json_object(client: httpx.Client, prompt: str, label: str) -> None:
    """response_format json_object gives a deterministic JSON object as content."""
    response = chat(client, prompt, response_format={"type": "json_object"})
    content = orjson.loads(response.json()["choices"][0]["message"]["content"])
    assert content == {"label": label, "confidence": 0.9, "echo": prompt}


def test_usage_arithmetic(client: httpx.Client) -> None:
    """0.3 token per ASCII char plus 4 per message, rounded up; hit + miss = prompt."""
    usage = chat(client, "hello").json()["usage"]
    # prompt: 5 chars * 0.3 + 4 = 5.5 -> 6; completion "echo: hello": 11 * 0.3 = 3.3 -> 4
    assert usage == {
        "prompt_tokens": 6,
        "completion_tokens": 4,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 6,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_non_ascii_costs_more(client: httpx.Client) -> None:
    """Non-ASCII characters count 0.6 token each."""
    usage = chat(client, "你好你好你").json()["usage"]
    assert usage["prompt_tokens"] == 7  # 5 * 0.6 + 4


def test_repeated_first_message_hits_the_cache(client: httpx.Client) -> None:
    """A first message seen before is served from cache in 64-token blocks."""
    system = {"role": "system", "content": "x" * 700}  # 700 * 0.3 + 4 = 214 tokens
    first = client.post(
        "/chat/completions",
        json={"model": "deepseek-chat", "messages": [system, {"role": "user", "content": "a"}]},
    ).json()["usage"]
    second = client.post(
        "/chat/completions",
        json={"model": "deepseek-chat", "messages": [system, {"role": "user", "content": "b"}]},
    ).json()["usage"]
    assert first["prompt_cache_hit_tokens"] == 0
    assert second["prompt_cache_hit_tokens"] == 192
    assert second["prompt_tokens_details"]["cached_tokens"] == 192
    assert second["prompt_cache_miss_tokens"] == second["prompt_tokens"] - 192


def test_reasoner_sends_reasoning_and_counts_it(client: httpx.Client) -> None:
    """deepseek-reasoner fills reasoning_content and bills it inside completion_tokens."""
    data = chat(client, "hello", model="deepseek-reasoner").json()
    message = data["choices"][0]["message"]
    assert message["content"] == "echo: hello"
    assert message["reasoning_content"] == "thinking about: hello"
    usage = data["usage"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning == 7  # 21 chars * 0.3 = 6.3 -> 7
    assert usage["completion_tokens"] == reasoning + 4


@pytest.mark.parametrize(
    "model",
    ["deepseek-flash", "deepseek-v4-flash", "deepseek-v4-flash-vision-exp", "deepseek-v4-pro"],
)
def test_current_models_think_by_default(client: httpx.Client, model: str) -> None:
    """Today's models answer with reasoning_content and count its reasoning_tokens."""
    data = chat(client, "hello", model=model).json()
    assert data["model"] == model
    assert data["choices"][0]["message"]["reasoning_content"] == "thinking about: hello"
    usage = data["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 7
    assert usage["completion_tokens"] == 7 + 4


def test_current_model_does_not_think_when_disabled(client: httpx.Client) -> None:
    """`"thinking": {"type": "disabled"}` gives a plain answer with no reasoning tokens."""
    data = chat(client, "hello", model="deepseek-flash", thinking={"type": "disabled"}).json()
    assert data["choices"][0]["message"]["reasoning_content"] is None
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert data["usage"]["completion_tokens"] == 4


def test_effort_changes_how_long_the_fake_thinks(client: httpx.Client) -> None:
    """Reasoning tokens grow from low to high (also medium, unset) to max."""

    def reasoning_tokens(**extra: Any) -> int:
        data = chat(client, "hello", model="deepseek-flash", **extra).json()
        return int(data["usage"]["completion_tokens_details"]["reasoning_tokens"])

    low, high, medium, unset, top = (
        reasoning_tokens(reasoning_effort="low"),
        reasoning_tokens(reasoning_effort="high"),
        reasoning_tokens(reasoning_effort="medium"),
        reasoning_tokens(),
        reasoning_tokens(reasoning_effort="max"),
    )
    assert low < high == medium == unset < top


def test_current_model_streams_its_thinking(client: httpx.Client) -> None:
    """Streamed, a thinking answer sends reasoning_content pieces before the content."""
    response = chat(client, "hi", model="deepseek-v4-pro", stream=True)
    deltas = [c["choices"][0]["delta"] for c in sse_events(response.text)[:-1]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "thinking about: hi"


def test_current_models_take_384k_max_tokens(client: httpx.Client) -> None:
    """Today's models answer up to 384K tokens (393,216); the 2025 chat model only 8K."""
    assert chat(client, model="deepseek-flash", max_tokens=393216).status_code == 200
    assert chat(client, model="deepseek-flash", max_tokens=393217).status_code == 400


def test_max_tokens_truncates_with_finish_reason_length(client: httpx.Client) -> None:
    """An answer longer than max_tokens is cut and finishes with "length"."""
    data = chat(client, "a long enough prompt to need cutting", max_tokens=3).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "echo: a lo"  # 3 tokens = 10 ASCII chars
    assert data["usage"]["completion_tokens"] == 3


def test_latency_delays_the_answer(client: httpx.Client, fake: FakeServer) -> None:
    """`latency` holds each answer back."""
    fake.update(latency=0.05)
    started = time.perf_counter()
    assert chat(client).status_code == 200
    assert time.perf_counter() - started >= 0.05


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        pytest.param([1, 2], 400, "JSON object", id="not-object"),
        pytest.param({"messages": [{"role": "user", "content": "x"}]}, 400, "model", id="no-model"),
        pytest.param({"model": "deepseek-chat", "messages": []}, 400, "messages", id="empty"),
        pytest.param(
            {"model": "deepseek-chat", "messages": [{"role": "bot", "content": "x"}]},
            400,
            "messages[0]",
            id="bad-role",
        ),
        pytest.param(body(model="gpt-4o"), 400, "Model Not Exist", id="unknown-model"),
        pytest.param(body(max_tokens=8193), 400, "max_tokens", id="chat-max-tokens"),
        pytest.param(body(max_tokens=0), 400, "max_tokens", id="zero-max-tokens"),
        pytest.param(
            body(model="deepseek-reasoner", max_tokens=65537), 400, "65536", id="reasoner-max"
        ),
        pytest.param(body(temperature=2.5), 422, "temperature", id="temperature"),
        pytest.param(body(thinking=True), 400, "thinking", id="thinking-not-object"),
        pytest.param(body(thinking={"type": "on"}), 400, "thinking", id="thinking-type"),
        pytest.param(body(reasoning_effort="huge"), 422, "reasoning_effort", id="effort"),
        pytest.param(body(reasoning_effort=3), 422, "reasoning_effort", id="effort-number"),
        pytest.param(body(user_id="a b"), 400, "user_id", id="user-id-space"),
        pytest.param(body(user_id="u" * 513), 400, "user_id", id="user-id-long"),
    ],
)
def test_invalid_requests_are_refused(
    client: httpx.Client, payload: Any, status: int, message: str
) -> None:
    """Bad bodies get the real API's status and an OpenAI-style error."""
    response = client.post("/chat/completions", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None


def test_reasoner_accepts_long_max_tokens(client: httpx.Client) -> None:
    """The reasoner's max_tokens goes up to 64K."""
    assert chat(client, model="deepseek-reasoner", max_tokens=65536).status_code == 200


@pytest.mark.parametrize("effort", ["low", "medium", "high", "xhigh", "max"])
def test_every_documented_effort_is_taken(client: httpx.Client, effort: str) -> None:
    """low, high and max, and medium and xhigh (which DeepSeek takes as high), are accepted."""
    response = chat(client, model="deepseek-flash", reasoning_effort=effort, user_id="u-1_A")
    assert response.status_code == 200


def test_malformed_json_is_a_400(client: httpx.Client) -> None:
    """A body that is not JSON is refused with 400."""
    response = client.post("/chat/completions", content=b"{nope")
    assert response.status_code == 400


# --- streaming -------------------------------------------------------------------------------


def test_stream_puts_usage_on_the_final_chunk(client: httpx.Client) -> None:
    """DeepSeek streaming: role, content pieces, a finish chunk with usage, then [DONE]."""
    response = chat(client, "a prompt long enough for pieces", stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "echo: a prompt long enough for pieces"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_reasoner_sends_reasoning_first(client: httpx.Client) -> None:
    """Reasoner streams reasoning_content pieces before content pieces."""
    response = chat(client, "hi", model="deepseek-reasoner", stream=True)
    deltas = [c["choices"][0]["delta"] for c in sse_events(response.text)[:-1]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning == "thinking about: hi"
    assert content == "echo: hi"
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    last_reasoning = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    assert last_reasoning < first_content


def test_stream_separate_usage_chunk(client: httpx.Client, fake: FakeServer) -> None:
    """OpenAI mode: usage comes in its own chunk with empty choices, when asked for."""
    fake.update(usage_chunk="separate")
    events = sse_events(chat(client, stream=True, stream_options={"include_usage": True}).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["prompt_tokens"] == 6
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-3]["usage"] is None


def test_stream_separate_mode_without_include_usage_has_no_usage(
    client: httpx.Client, fake: FakeServer
) -> None:
    """OpenAI mode sends no usage unless stream_options.include_usage is true."""
    fake.update(usage_chunk="separate")
    events = sse_events(chat(client, stream=True).text)
    assert all(e["usage"] is None for e in events[:-1])


# --- scripted faults -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422, 500, 502, 504])
def test_error_fault_marker(client: httpx.Client, status: int) -> None:
    """[[fault:STATUS]] answers that status with an OpenAI-style JSON error."""
    response = chat(client, f"row [[fault:{status}]]")
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_fault_marker_fires_n_times_then_succeeds(client: httpx.Client) -> None:
    """[[fault:500*2]] fails the first two requests with that prompt, then answers."""
    statuses = [chat(client, "row 3 [[fault:500*2]]").status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert chat(client, "row 4 [[fault:500*2]]").status_code == 500  # counted per prompt


def test_fault_marker_always(client: httpx.Client) -> None:
    """[[fault:KIND*always]] never stops faulting."""
    assert [chat(client, "x [[fault:502*always]]").status_code for _ in range(3)] == [502] * 3


def test_unknown_fault_marker_is_a_400(client: httpx.Client) -> None:
    """A typo in a marker is reported, not silently ignored."""
    response = chat(client, "x [[fault:5OO]]")
    assert response.status_code == 400
    assert "unknown fault kind" in response.json()["error"]["message"]


def test_429_fault_sends_retry_after(client: httpx.Client, fake: FakeServer) -> None:
    """A 429 fault carries Retry-After from the config, in whole seconds."""
    fake.update(retry_after=2.0)
    response = chat(client, "x [[fault:429]]")
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "2"
    assert "retry-after-ms" not in response.headers


def test_429_fault_with_explicit_delay(client: httpx.Client) -> None:
    """[[fault:429@0.05]] sends retry-after-ms 50 and Retry-After rounded up to 1."""
    response = chat(client, "x [[fault:429*2@0.05]]")
    assert response.status_code == 429
    assert response.headers["retry-after-ms"] == "50"
    assert response.headers["retry-after"] == "1"


def test_503_fault_is_html(client: httpx.Client) -> None:
    """A 503 comes with an HTML body, as proxies send."""
    response = chat(client, "x [[fault:503]]")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    assert "503 Service Temporarily Unavailable" in response.text


def test_drop_fault_closes_the_connection(client: httpx.Client) -> None:
    """[[fault:drop]] hangs up without any response; the next request works."""
    with pytest.raises(httpx.RemoteProtocolError):
        chat(client, "x [[fault:drop]]")
    assert chat(client, "x [[fault:drop]]").status_code == 200


def test_blank_fault_is_whitespace_with_200(client: httpx.Client) -> None:
    """[[fault:blank]] is a 200 whose JSON body is only whitespace."""
    response = chat(client, "x [[fault:blank]]")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.text == "\n\n\n"


def test_keepalive_fault_sends_blank_lines_then_json(
    client: httpx.Client, fake: FakeServer
) -> None:
    """[[fault:keepalive]] sends blank lines first; the whole body still parses as JSON."""
    fake.update(keepalive_lines=4, keepalive_interval=0.005)
    response = chat(client, "row 9 [[fault:keepalive]]")
    assert response.status_code == 200
    assert response.text.startswith("\n\n\n\n{")
    assert response.json()["choices"][0]["message"]["content"] == "echo: row 9 [[fault:keepalive]]"


def test_keepalive_fault_in_a_stream_sends_comments(client: httpx.Client) -> None:
    """In a stream the keepalive fault sends `: keep-alive` comments before the chunks."""
    response = chat(client, "x [[fault:keepalive]]", stream=True)
    assert response.text.startswith(": keep-alive\n\n" * 3 + "data: ")
    assert sse_events(response.text)[-1] == "[DONE]"


def test_truncated_fault_cuts_the_json(client: httpx.Client) -> None:
    """[[fault:truncated]] is a 200 whose JSON stops halfway."""
    response = chat(client, "x [[fault:truncated]]")
    assert response.status_code == 200
    assert response.text.startswith('{"id"')
    with pytest.raises(ValueError):
        response.json()


def test_truncated_fault_in_a_stream_has_no_finish_or_done(client: httpx.Client) -> None:
    """A truncated stream ends without finish_reason and without [DONE]."""
    events = sse_events(chat(client, "a long prompt here [[fault:truncated]]", stream=True).text)
    assert events
    assert "[DONE]" not in events
    assert all(e["choices"][0]["finish_reason"] is None for e in events)


def test_isr_fault_is_an_empty_200(client: httpx.Client) -> None:
    """[[fault:isr]] is a valid completion with finish_reason insufficient_system_resource."""
    choice = chat(client, "x [[fault:isr]]").json()["choices"][0]
    assert choice["finish_reason"] == "insufficient_system_resource"
    assert choice["message"]["content"] == ""


def test_random_faults_are_reproducible(client: httpx.Client, fake: FakeServer) -> None:
    """The same seed gives the same fault sequence."""
    config = FakeConfig(fail_rate=0.5, faults=("500", "502"), seed=7)
    runs = []
    for _ in range(2):
        fake.reset(config)
        runs.append([chat(client, f"row {i}").status_code for i in range(12)])
    assert runs[0] == runs[1]
    assert {200, 500, 502} <= set(runs[0])


# --- auth and budget -------------------------------------------------------------------------


def test_wrong_key_gets_401(client: httpx.Client, fake: FakeServer) -> None:
    """With api_key set, a wrong or missing Bearer key gets 401; the right one works."""
    fake.update(api_key="sk-right")
    wrong = client.post("/chat/completions", json=body(), headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert chat(client).status_code == 401
    right = client.post(
        "/chat/completions", json=body(), headers={"Authorization": "Bearer sk-right"}
    )
    assert right.status_code == 200


def test_budget_gives_402_until_raised(client: httpx.Client, fake: FakeServer) -> None:
    """Past token_budget chat requests get 402; raising the budget lets them through."""
    fake.update(token_budget=15)
    assert chat(client).status_code == 200  # 10 tokens
    assert chat(client).status_code == 200  # 20 tokens: the last one may overshoot
    refused = chat(client)
    assert refused.status_code == 402
    assert refused.json()["error"]["message"] == "Insufficient Balance"
    assert client.get("/user/balance").json()["is_available"] is False
    fake.update(token_budget=1000)
    assert chat(client).status_code == 200
    assert client.get("/user/balance").json()["fake_remaining_tokens"] == 970


# --- rate limits -----------------------------------------------------------------------------


def test_rpm_limit_gives_429_with_headers(client: httpx.Client, fake: FakeServer) -> None:
    """Over rpm within the window: 429, Retry-After, and x-ratelimit headers."""
    fake.update(rpm=2, window=1.0)
    first = chat(client)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert chat(client).status_code == 200
    refused = chat(client)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert 0 < int(refused.headers["retry-after-ms"]) <= 1000
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+ms|1s", refused.headers["x-ratelimit-reset-requests"])
    assert fake.stats()["rate_limited"] == 1


def test_tpm_limit_charges_prompt_plus_max_tokens(client: httpx.Client, fake: FakeServer) -> None:
    """TPM charges the prompt estimate plus max_tokens (4096 when absent)."""
    fake.update(tpm=4200, window=1.0)
    ok = chat(client, max_tokens=100)  # charges 6 + 100
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(4200 - 106)
    refused = chat(client)  # 6 + 4096 more would exceed 4200
    assert refused.status_code == 429
    assert "tokens" in refused.json()["error"]["message"]
    assert "x-ratelimit-limit-requests" not in refused.headers


def test_concurrency_limit_gives_429_without_delay(client: httpx.Client, fake: FakeServer) -> None:
    """Beyond max_concurrency in flight: an immediate 429 with no Retry-After (as DeepSeek)."""
    fake.update(max_concurrency=1, latency=0.1)
    slow: list[int] = []
    worker = threading.Thread(target=lambda: slow.append(chat(client, "slow").status_code))
    worker.start()
    deadline = time.monotonic() + 1.0
    while fake.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    refused = chat(client, "fast")
    worker.join()
    assert slow == [200]
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    assert fake.stats()["max_in_flight"] == 1


def test_rate_headers_can_be_turned_off(client: httpx.Client, fake: FakeServer) -> None:
    """rate_headers=False keeps limiting but sends no x-ratelimit headers."""
    fake.update(rpm=1, window=1.0, rate_headers=False)
    assert "x-ratelimit-limit-requests" not in chat(client).headers
    assert chat(client).status_code == 429


def test_limiter_window_slides_and_rejections_are_free() -> None:
    """Rejected requests do not count; entries leave the window after `window` seconds."""
    limiter = RateLimiter()
    limits = Limits(rpm=2, tpm=None, max_concurrency=None, window=1.0)
    assert limiter.admit(0.0, 1, limits, headers=False).admitted
    assert limiter.admit(0.5, 1, limits, headers=False).admitted
    refused = limiter.admit(0.6, 1, limits, headers=False)
    assert not refused.admitted
    assert refused.retry_after == pytest.approx(0.4)
    assert not limiter.admit(0.9, 1, limits, headers=False).admitted
    assert limiter.admit(1.0, 1, limits, headers=False).admitted  # the 0.0 entry has left


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.85, "850ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3725.25, "1h2m5.25s")],
)
def test_go_duration(seconds: float, text: str) -> None:
    """Reset headers use Go's duration format."""
    assert go_duration(seconds) == text


# --- introspection ---------------------------------------------------------------------------


def test_stats_count_everything(client: httpx.Client, fake: FakeServer) -> None:
    """/stats counts requests, statuses, faults, tokens and rate-limit rejections."""
    chat(client)
    chat(client, "x [[fault:500]]")
    chat(client, "x [[fault:blank]]")
    client.post("/chat/completions", json=body(model="nope"))
    stats = client.get("/stats").json()
    assert stats == fake.stats()
    assert stats["requests"] == 4
    assert stats["ok"] == 1
    assert stats["by_status"] == {"200": 2, "400": 1, "500": 1}
    assert stats["faults"] == {"500": 1, "blank": 1}
    assert stats["rate_limited"] == 0
    assert stats["tokens_served"] == 10
    assert stats["max_in_flight"] == 1


def test_request_log_keeps_bodies_in_order_without_keys(
    client: httpx.Client, fake: FakeServer
) -> None:
    """requests() and /_fake/requests return the parsed bodies in arrival order, no headers."""
    fake.update(api_key="sk-secret")
    for prompt in ("one", "two"):
        client.post(
            "/chat/completions", json=body(prompt), headers={"Authorization": "Bearer sk-secret"}
        )
    logged = fake.requests()
    assert logged == [body("one"), body("two")]
    assert client.get("/_fake/requests").json() == logged
    assert "sk-secret" not in orjson.dumps(logged).decode()


def test_reset_clears_state(client: httpx.Client, fake: FakeServer) -> None:
    """reset() clears counters, the log and marker counts."""
    assert chat(client, "x [[fault:500]]").status_code == 500
    fake.reset()
    assert fake.stats()["requests"] == 0
    assert fake.requests() == []
    assert chat(client, "x [[fault:500]]").status_code == 500  # the script starts over
    client.post("/_fake/reset")
    assert fake.stats()["requests"] == 0


def test_update_validates_fields(fake: FakeServer) -> None:
    """update() rejects unknown fields and bad values, leaving the config unchanged."""
    with pytest.raises(TypeError):
        fake.update(no_such_field=1)
    with pytest.raises(ValueError):
        fake.update(fail_rate=2.0)
    assert fake.config == FakeConfig()


def test_config_rejects_unknown_fault_kinds() -> None:
    """FakeConfig validates fault names when built."""
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FakeConfig(faults=("429", "boom"))


def test_models_lists_deepseek_models(client: httpx.Client) -> None:
    """/models and /v1/models list today's models, then the 2025 ones resellers serve."""
    for path in ("/models", "/v1/models"):
        ids = [m["id"] for m in client.get(path).json()["data"]]
        assert ids == [
            "deepseek-flash",
            "deepseek-v4-flash",
            "deepseek-v4-flash-vision-exp",
            "deepseek-v4-pro",
            "deepseek-chat",
            "deepseek-reasoner",
        ]


def test_balance_has_deepseek_shape(client: httpx.Client) -> None:
    """/user/balance answers in DeepSeek's shape."""
    data = client.get("/v1/user/balance").json()
    assert data["is_available"] is True
    assert data["balance_infos"][0]["currency"] == "CNY"
    assert data["balance_infos"][0]["total_balance"] == "110.00"


# --- command ---------------------------------------------------------------------------------


def test_command_help_lists_the_options() -> None:
    """`fake-server --help` shows the knobs."""
    result = CliRunner().invoke(fake_server_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--fail-rate", "--faults", "--rpm", "--usage-chunk", "--no-rate-headers"):
        assert option in result.output


def test_command_rejects_bad_config() -> None:
    """A bad option value is a usage error, before anything binds a port."""
    result = CliRunner().invoke(fake_server_command, ["--faults", "429,boom"])
    assert result.exit_code == 2
    assert "unknown fault kinds" in result.output


def test_command_import_is_light() -> None:
    """Importing the command does not import aiohttp or orjson (`batchrun --help` stays fast)."""
    code = (
        "import sys, batchrun.fake.command; print(sorted({'aiohttp', 'orjson'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


# --- servers that are not DeepSeek: usage-counted TPM, fixed windows, odd 429s ----------------


def test_tpm_counting_usage_charges_the_prompt_then_the_completion(
    client: httpx.Client, fake: FakeServer
) -> None:
    """`tpm_counts="usage"`: no max_tokens is charged on admission; the prompt is, and the
    completion once served."""
    fake.update(tpm=1000, window=60.0, tpm_counts="usage")
    first = chat(client, "hello")  # no max_tokens: OpenAI-style counting would charge 4096
    assert first.status_code == 200
    usage = first.json()["usage"]
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    # remaining was measured on admission: only the prompt was counted then
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - prompt)
    second = chat(client, "hello")
    spent = 2 * prompt + completion  # the first answer's completion now counts too
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - spent)


def test_fixed_window_resets_every_count_at_the_boundary(
    client: httpx.Client, fake: FakeServer
) -> None:
    """A fixed window forgets every count at its boundary, unlike a sliding one: two requests
    sent apart in one window both have room again right after the reset."""
    window, gap = 0.25, 0.08
    fake.update(rpm=2, window=window, fixed_window=True, rate_headers=False)
    while time.monotonic() % window > 0.03:  # start near the beginning of a window
        time.sleep(0.002)
    assert chat(client).status_code == 200
    time.sleep(gap)
    assert chat(client).status_code == 200
    refused = chat(client)
    assert refused.status_code == 429
    wait = int(refused.headers["retry-after-ms"]) / 1000
    assert wait <= window - gap + 0.01  # until the boundary, not until the first entry ages
    time.sleep(wait + 0.005)
    # sliding, the second request would still count for another `gap` seconds
    assert [chat(client).status_code for _ in range(2)] == [200, 200]


@pytest.mark.parametrize(
    ("limit_retry", "present", "absent"),
    [
        pytest.param("vendor", {"llm_provider-retry-after"}, {"retry-after"}, id="vendor"),
        pytest.param("none", set(), {"retry-after", "llm_provider-retry-after"}, id="none"),
    ],
)
def test_rate_limit_429_without_retry_after(
    client: httpx.Client, fake: FakeServer, limit_retry: str, present: set[str], absent: set[str]
) -> None:
    """A proxy's 429 may carry only a vendor delay header, or none at all."""
    fake.update(rpm=1, window=60.0, rate_headers=False, limit_retry=limit_retry)
    assert chat(client).status_code == 200
    refused = chat(client)
    assert refused.status_code == 429
    assert present <= set(refused.headers)
    assert not absent & set(refused.headers)
    if present:
        assert 59 <= int(refused.headers["llm_provider-retry-after"]) <= 60


def test_rate_headers_without_reset_fields(client: httpx.Client, fake: FakeServer) -> None:
    """Some proxies send limit and remaining but no x-ratelimit-reset-*."""
    fake.update(rpm=5, tpm=10_000, window=60.0, reset_headers=False)
    answer = chat(client, max_tokens=10)
    assert answer.headers["x-ratelimit-remaining-requests"] == "4"
    assert "x-ratelimit-limit-tokens" in answer.headers
    assert not any(name.startswith("x-ratelimit-reset") for name in answer.headers)


def test_fake_server_command_takes_the_new_behaviours() -> None:
    """The command line reaches every new knob."""
    from click.testing import CliRunner

    from batchrun.fake.command import fake_server_command

    result = CliRunner().invoke(fake_server_command, ["--tpm-counts", "nonsense"])
    assert result.exit_code == 2 and "max_tokens" in result.output
    helptext = CliRunner().invoke(fake_server_command, ["--help"]).output
    for option in ("--tpm-counts", "--fixed-window", "--limit-retry", "--no-reset-headers"):
        assert option in helptext

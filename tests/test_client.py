"""Narrow parsing edge cases of odd server answers, through httpx.MockTransport."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest

from batchrun.client import Client, parse_retry_after
from batchrun.errors import ConfigError, RetryableError
from batchrun.fake import FakeServer

pytestmark = pytest.mark.anyio


def client_answering(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    client = Client(
        "http://127.0.0.1:9",
        api_key=None,
        max_connections=1,
        transport=httpx.MockTransport(handler),
    )
    return client


def ok_body(**overrides: object) -> bytes:
    body: dict[str, object] = {
        "id": "x",
        "model": "deepseek-chat",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    body.update(overrides)
    return orjson.dumps(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(ok_body(choices=[]), id="empty-choices"),
        pytest.param(ok_body(choices=[{"index": 0, "message": "hi"}]), id="message-not-object"),
        pytest.param(ok_body(choices="nope"), id="choices-not-list"),
    ],
)
async def test_a_200_without_a_message_is_a_retryable_bad_response(body: bytes) -> None:
    """A 200 whose first choice holds no message object is retried, not written as ok."""
    async with client_answering(lambda request: httpx.Response(200, content=body)) as client:
        with pytest.raises(RetryableError) as caught:
            await client.send({"model": "m", "messages": []})
    assert caught.value.error_class == "bad_response"


async def test_non_string_fields_are_kept_as_text() -> None:
    """A proxy's numeric id or model does not break the string columns."""
    body = ok_body(id=12345, model=7)
    async with client_answering(lambda request: httpx.Response(200, content=body)) as client:
        completion = await client.send({"model": "m", "messages": []})
    assert completion.response_id == "12345" and completion.model == "7"


async def test_undecodable_body_is_a_network_error() -> None:
    """A body that claims gzip but is not is a retryable fault, not a crash."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})

    async with client_answering(handler) as client:
        with pytest.raises(RetryableError) as caught:
            await client.send({"model": "m", "messages": []})
    assert caught.value.error_class == "network"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        pytest.param({"retry-after": "3"}, 3.0, id="retry-after"),
        pytest.param({"retry-after-ms": "1500", "retry-after": "2"}, 1.5, id="millis-first"),
        pytest.param({"llm_provider-retry-after": "60"}, 60.0, id="vendor"),
        pytest.param({"x-ratelimit-reset-requests": "6m0s"}, 360.0, id="go-duration"),
        pytest.param({"x-ratelimit-reset-tokens": "2.5"}, 2.5, id="reset-seconds"),
        pytest.param(
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "850ms",
                "x-ratelimit-remaining-tokens": "900",
                "x-ratelimit-reset-tokens": "30s",
            },
            0.85,
            id="the-exhausted-limit",
        ),
        pytest.param(
            {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "4s"},
            4.0,
            id="later-when-unsaid",
        ),
        pytest.param(
            {"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-requests": "5s"},
            None,
            id="room-left-is-another-limit",
        ),
        pytest.param({"x-ratelimit-reset-requests": "soon"}, None, id="garbage"),
        pytest.param({}, None, id="nothing"),
    ],
)
def test_parse_retry_after_reads_vendor_headers(
    headers: dict[str, str], seconds: float | None
) -> None:
    """Vendor delay headers and x-ratelimit-reset-* are read like Retry-After."""
    got = parse_retry_after(httpx.Headers(headers))
    assert got == (pytest.approx(seconds) if seconds is not None else None)


# --- what the client sends, over the real HTTP path ------------------------------------------

CHAT = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hello"}]}
#: the aiohttp transport runs on asyncio only
on_asyncio = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@on_asyncio
async def test_requests_go_through_the_proxy_the_environment_names(
    fake: FakeServer, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured: a host that does not resolve is reached through the proxy."""
    no_proxy_env.setenv("HTTP_PROXY", fake.base_url)  # the fake answers absolute-form targets
    async with Client("http://api.example.invalid", api_key=None, max_connections=1) as client:
        completion = await client.send(CHAT)
    assert completion.content and fake.stats()["requests"] == 1


@on_asyncio
async def test_no_proxy_exempts_its_hosts(
    fake: FakeServer, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """A host NO_PROXY names is reached directly, not through HTTP_PROXY."""
    no_proxy_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    async with Client(fake.base_url, api_key=None, max_connections=1) as client:
        completion = await client.send(CHAT)
    assert completion.content


@on_asyncio
async def test_the_httpx_transport_still_sends(fake: FakeServer) -> None:
    """transport = 'httpx' (httpx's own pool) gets answers from the fake as the default does."""
    async with Client(fake.base_url, api_key=None, max_connections=2, transport="httpx") as client:
        completion = await client.send({**CHAT, "stream": False})
        streamed = await client.send({**CHAT, "stream": True})
    assert completion.content and streamed.content == completion.content


async def test_cookies_an_answer_sets_are_not_sent_back() -> None:
    """The client keeps no cookie jar: a Set-Cookie never comes back in a later request."""
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, content=ok_body(), headers={"set-cookie": "session=abc"})

    async with client_answering(handler) as client:
        for _ in range(2):
            await client.send({"model": "m", "messages": []})
    assert seen == [None, None]


@on_asyncio
async def test_no_proxy_with_a_port_exempts_that_server(
    fake: FakeServer, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """NO_PROXY=host:port (a local server) is reached directly, as httpx's client did."""
    no_proxy_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    no_proxy_env.setenv("NO_PROXY", f"127.0.0.1:{fake.port}")
    async with Client(fake.base_url, api_key=None, max_connections=1) as client:
        completion = await client.send(CHAT)
    assert completion.content


def test_a_socks_proxy_is_refused_not_spoken_to_as_http(no_proxy_env: pytest.MonkeyPatch) -> None:
    """ALL_PROXY=socks5://... is refused with a message naming it, before anything is sent."""
    no_proxy_env.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    with pytest.raises(ConfigError, match="socks5://... .*only HTTP proxies"):
        Client("http://api.example.invalid", api_key=None, max_connections=1)


async def test_an_odd_answer_s_counts_and_texts_are_normalised() -> None:
    """A proxy's answer with counts that are not ints (a bool, a string, a float) gets no
    count, and its text fields given as a number or an object come as their text."""
    answer = {
        "id": 7,
        "model": {"name": "m"},
        "choices": [
            {"message": {"content": 12, "reasoning_content": None}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": True,
            "completion_tokens": "3",
            "total_tokens": 8.0,
            "prompt_cache_hit_tokens": 2,
            "prompt_cache_miss_tokens": None,
            "completion_tokens_details": {"reasoning_tokens": False},
        },
    }

    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=orjson.dumps(answer))

    transport = httpx.MockTransport(reply)
    async with Client(
        "http://127.0.0.1:9", api_key=None, max_connections=1, transport=transport
    ) as client:
        completion = await client.send({"model": "m", "messages": []})
    assert (completion.content, completion.reasoning_content) == ("12", None)
    assert (completion.model, completion.response_id) == ('{"name":"m"}', "7")
    assert completion.prompt_tokens is None and completion.completion_tokens is None
    assert completion.total_tokens is None and completion.prompt_cache_miss_tokens is None
    assert completion.prompt_cache_hit_tokens == 2 and completion.reasoning_tokens is None

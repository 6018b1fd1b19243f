"""The send path's fast ways (issue 12), each beside the slow way it must still take."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import anyio
import httpx
import orjson
import pytest

from batchrun.client import USER_AGENT, Client
from batchrun.deadline import Deadlines
from batchrun.errors import RateLimited, RetryableError
from batchrun.fake import FakeServer
from batchrun.transport import MAX_SESSIONS, AiohttpTransport, FixedHeaders, ReadWhole

pytestmark = pytest.mark.anyio

CHAT = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hello"}]}
#: the aiohttp transport and the shared deadlines run on asyncio
on_asyncio = pytest.mark.parametrize("anyio_backend", ["asyncio"])


# --- the attempt deadline ----------------------------------------------------------------------


@on_asyncio
async def test_the_deadline_ends_an_answer_stalled_by_keepalive_lines(fake: FakeServer) -> None:
    """On asyncio the shared `Deadlines` end an attempt that keep-alive lines keep alive, and
    the task is left uncancelled (the deadline's cancellation taken back)."""
    fake.update(keepalive_lines=200, keepalive_interval=0.02)
    async with Client(fake.base_url, api_key=None, max_connections=2, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(RetryableError, match=r"no complete answer within 0\.2 s") as caught:
            await client.send(
                {**CHAT, "messages": [{"role": "user", "content": "x [[fault:keepalive]]"}]}
            )
        assert time.monotonic() - started < 2.0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0)  # no cancellation left over for the next await
        completion = await client.send(CHAT)  # the next attempt has a deadline of its own
    assert caught.value.error_class == "timeout" and completion.content


@on_asyncio
async def test_the_deadline_leaves_a_prompt_answer_alone(fake: FakeServer) -> None:
    """Answers well within the deadline come back whole, many at once, and leave no deadline
    or timer behind."""
    async with Client(fake.base_url, api_key=None, max_connections=8, timeout=5.0) as client:
        async with anyio.create_task_group() as group:
            for _ in range(40):
                group.start_soon(client.send, CHAT)
        deadlines = client.deadlines
        assert deadlines.pending == 0 and deadlines.armed  # the timer waits for the next
    assert not deadlines.armed


@on_asyncio
async def test_on_httpx_s_own_pool_the_deadline_is_an_anyio_scope(fake: FakeServer) -> None:
    """`transport = "httpx"` keeps the anyio scope (httpcore shields its connection clean-up
    from anyio cancellation, not from a plain task.cancel()): the shared deadlines stay
    empty while the attempt waits, and the deadline still ends it."""
    fake.update(keepalive_lines=200, keepalive_interval=0.02)
    stalled = {**CHAT, "messages": [{"role": "user", "content": "x [[fault:keepalive]]"}]}
    waiting: list[int] = []
    async with Client(
        fake.base_url, api_key=None, max_connections=1, timeout=0.3, transport="httpx"
    ) as client:
        asyncio.get_running_loop().call_later(0.1, lambda: waiting.append(client.deadlines.pending))
        with pytest.raises(RetryableError, match=r"no complete answer within 0\.3 s"):
            await client.send(stalled)
    assert waiting == [0] and not client.deadlines.armed


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_off_asyncio_the_deadline_is_an_anyio_scope() -> None:
    """On trio (no asyncio task to cancel) the attempt's deadline is a cancel scope."""

    async def stall(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)
        raise AssertionError("the deadline should have ended the attempt")

    client = Client(
        "http://127.0.0.1:9",
        api_key=None,
        max_connections=1,
        timeout=0.1,
        transport=httpx.MockTransport(stall),
    )
    async with client:
        with pytest.raises(RetryableError, match=r"no complete answer within 0\.1 s"):
            await client.send(CHAT)
    assert client.deadlines.pending == 0


def _in_one_pass(first_due: float, then: Callable[[], object]) -> None:
    """Block the loop past `first_due` (a deadline's time) and call `then` just after it: the
    next loop pass then runs the deadline's timer and `then` one after the other, before any
    task sees either (as a stop landing with a deadline does)."""
    loop = asyncio.get_running_loop()
    loop.call_at(first_due + 0.02, then)
    time.sleep(max(first_due - loop.time(), 0.0) + 0.1)


async def _cut_by_its_deadline(deadlines: Deadlines) -> bool:
    """Whether a long sleep under one of `deadlines` ends as that deadline's expiry (the
    deadline taken back); a cancellation from elsewhere goes on, as `Deadlines` says."""
    task = asyncio.current_task()
    assert task is not None
    cancelling = deadlines.start(task)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        if deadlines.expired(task, cancelling):
            return True
        raise
    finally:
        deadlines.stop(task)
    return False


@on_asyncio
async def test_a_cancellation_from_elsewhere_wins_over_a_passed_deadline() -> None:
    """When the deadline passes and something else cancels the task in the same loop pass,
    the CancelledError goes on: the task was cancelled, not merely timed out."""
    deadlines = Deadlines(0.05)
    seen: list[bool] = []

    async def attempt() -> None:
        try:
            seen.append(await _cut_by_its_deadline(deadlines))
        except asyncio.CancelledError:
            seen.append(False)  # not taken for the deadline's: it goes on
            raise

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(attempt())
    await asyncio.sleep(0)  # in the attempt, its deadline 0.05 s away
    _in_one_pass(loop.time() + 0.05, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False] and deadlines.pending == 0
    deadlines.close()


@on_asyncio
async def test_a_stop_landing_with_the_deadline_leaves_send_as_a_cancellation(
    fake: FakeServer,
) -> None:
    """An anyio scope cancelled (a stop's grace cancel, a second Ctrl-C) in the same loop
    pass as the attempt's deadline, just after it: `send` lets the cancellation through
    rather than raising a timeout, which would count the attempt as failed."""
    fake.update(keepalive_lines=200, keepalive_interval=0.02)
    stalled = {**CHAT, "messages": [{"role": "user", "content": "x [[fault:keepalive]]"}]}
    outcome: list[str] = []
    loop = asyncio.get_running_loop()
    async with Client(fake.base_url, api_key=None, max_connections=1, timeout=0.3) as client:
        with anyio.CancelScope() as scope:
            # 0.1 s into the attempt: the deadline is 0.2 s away, the stop just after it
            loop.call_later(0.1, _in_one_pass, loop.time() + 0.3, scope.cancel)
            try:
                await client.send(stalled)
                outcome.append("answered")
            except RetryableError as exc:
                outcome.append(exc.error_class)
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise
        assert client.deadlines.pending == 0
        completion = await client.send(CHAT)  # nothing left over for the next attempt
    assert outcome == ["cancelled"] and scope.cancelled_caught and completion.content
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@on_asyncio
async def test_a_deadline_alone_still_comes_out_as_a_timeout_beside_an_idle_scope(
    fake: FakeServer,
) -> None:
    """The slow way of the mend above is taken only when a scope was cancelled: inside an
    anyio scope nobody cancels, a passed deadline is a timeout as before."""
    fake.update(keepalive_lines=200, keepalive_interval=0.02)
    stalled = {**CHAT, "messages": [{"role": "user", "content": "x [[fault:keepalive]]"}]}
    async with Client(fake.base_url, api_key=None, max_connections=1, timeout=0.2) as client:
        with anyio.CancelScope() as scope:
            with pytest.raises(RetryableError) as caught:
                await client.send(stalled)
    assert caught.value.error_class == "timeout" and not scope.cancelled_caught


@on_asyncio
async def test_a_passed_deadline_alone_is_taken_back() -> None:
    deadlines = Deadlines(0.01)
    seen: list[tuple[bool, int]] = []

    async def attempt() -> None:
        expired = await _cut_by_its_deadline(deadlines)
        task = asyncio.current_task()
        assert task is not None
        seen.append((expired, task.cancelling()))

    await asyncio.wait_for(asyncio.create_task(attempt()), 5)
    assert seen == [(True, 0)]
    deadlines.close()


# --- the request and the answer as httpx objects --------------------------------------------


def test_fixed_headers_read_as_httpx_headers_and_refuse_changes() -> None:
    plain = httpx.Headers({"content-type": "application/json", "authorization": "Bearer k"})
    fixed = FixedHeaders(plain)
    assert fixed.multi_items() == plain.multi_items() and fixed.raw == plain.raw
    assert fixed == plain and fixed["Content-Type"] == "application/json"
    fixed.multi_items().clear()  # a copy each time: the set itself is untouched
    assert len(fixed.multi_items()) == 2
    for change in (
        lambda: fixed.__setitem__("x", "1"),
        lambda: fixed.__delitem__("authorization"),
        lambda: fixed.update({"x": "1"}),
    ):
        with pytest.raises(TypeError):
            change()
    assert fixed.pop("transfer-encoding", None) is None  # what a transport may try


@on_asyncio
async def test_the_aiohttp_transport_takes_any_kind_of_request_body(fake: FakeServer) -> None:
    """A request made with `content=` (read by httpx) or an async stream of chunks is sent as
    whole as the client's own unread ByteStream."""
    async with Client(fake.base_url, api_key=None, max_connections=2) as client:
        transport = client._transport

        async def chunks() -> object:
            yield orjson.dumps(CHAT)

        for request in (
            httpx.Request("POST", client.url, content=orjson.dumps(CHAT)),
            httpx.Request("POST", client.url, content=chunks()),  # type: ignore[arg-type]
            client._request(orjson.dumps(CHAT)),
        ):
            response = await transport.handle_async_request(request)
            body = await response.aread()
            await response.aclose()
            assert response.status_code == 200, body
            assert orjson.loads(body)["choices"][0]["message"]["content"] == "echo: hello"


@on_asyncio
async def test_an_answer_s_httpx_headers_are_made_when_read(fake: FakeServer) -> None:
    """The transport's `httpx.Response` has the answer's headers once asked for them (and
    takes new ones as any response does)."""
    async with Client(fake.base_url, api_key=None, max_connections=1) as client:
        response = await client._transport.handle_async_request(client._request(orjson.dumps(CHAT)))
        await response.aread()
        await response.aclose()
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("content-length") == str(len(response.content))
    assert response.reason_phrase == "OK" and response.http_version == "HTTP/1.1"
    response.headers = httpx.Headers({"x-set": "1"})
    assert dict(response.headers) == {"x-set": "1"}


@on_asyncio
async def test_a_gzip_answer_through_the_aiohttp_transport(fake: FakeServer) -> None:
    """A server that gzips its answers is decoded (by httpx's decoders), not taken as JSON."""
    fake.update(compress=True)
    async with Client(fake.base_url, api_key=None, max_connections=1) as client:
        completion = await client.send(CHAT)
    assert completion.content == "echo: hello" and completion.prompt_tokens
    assert completion.headers is not None and completion.headers["content-encoding"] == "gzip"


def test_deadlines_used_again_from_a_new_loop_still_fire() -> None:
    """A timer left on a closed loop does not keep the next loop's deadlines from firing."""
    deadlines = Deadlines(0.01)

    async def leave_a_timer() -> None:
        task = asyncio.current_task()
        assert task is not None
        deadlines.start(task)
        deadlines.stop(task)  # the timer stays armed on this loop, which then closes

    asyncio.run(leave_a_timer())
    assert asyncio.run(_cut_by_its_deadline(deadlines)) is True


def test_deadlines_left_with_a_task_on_a_closed_loop_still_fire_on_the_next() -> None:
    """A task still holding a deadline when its loop closed (a worker's loop ended mid
    attempt) does not keep the next loop's deadlines from firing."""
    deadlines = Deadlines(0.05)
    old_loop = asyncio.new_event_loop()

    async def stuck() -> None:
        task = asyncio.current_task()
        assert task is not None
        deadlines.start(task)
        await asyncio.sleep(100)

    old_loop.create_task(stuck())
    old_loop.run_until_complete(asyncio.sleep(0.01))
    old_loop.close()

    assert asyncio.run(_cut_by_its_deadline(deadlines)) is True
    assert deadlines.pending == 0


# --- the run's fixed headers and the answer read whole (aiohttp transport) ------------------

ANSWER = orjson.dumps(
    {"id": "x", "model": "m", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
)
KEY = "sk-send-path-test-0123456789"


class WireServer:
    """A raw HTTP/1.1 server on 127.0.0.1: keeps every request's head as sent (names, order,
    values) and answers each with `answer`, whole bytes given by the test."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.heads: list[list[tuple[str, str]]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> WireServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")[1:-2]
                head = [(name, value.strip()) for name, value in (x.split(":", 1) for x in lines)]
                self.heads.append(head)
                length = next(int(v) for n, v in head if n.lower() == "content-length")
                await reader.readexactly(length)
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def seen(self, index: int = -1) -> list[tuple[str, str]]:
        """A request's headers, names in lower case (HTTP's are case-insensitive)."""
        return [(name.lower(), value) for name, value in self.heads[index]]


def _ok(answer: bytes = ANSWER, *headers: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in ("Content-Type: application/json", *headers))
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (
        head.encode(),
        len(answer),
        answer,
    )


def _fixed_set(port: int, length: int) -> list[tuple[str, str]]:
    return [
        ("host", f"127.0.0.1:{port}"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
        ("user-agent", USER_AGENT),
        ("authorization", f"Bearer {KEY}"),
        ("content-length", str(length)),
    ]


@on_asyncio
async def test_a_run_s_fixed_headers_go_once_to_a_session_and_reach_the_wire_whole() -> None:
    """A request's `FixedHeaders` go through the session holding them as its defaults (no
    session for requests' own headers is made), and the server sees the same headers, in
    the same order, for bodies of two lengths."""
    async with WireServer(_ok()) as server:
        async with Client(
            f"http://127.0.0.1:{server.port}", api_key=KEY, max_connections=1
        ) as client:
            short, longer = CHAT, {**CHAT, "model": "deepseek-reasoner"}
            for body in (short, longer):
                assert (await client.send(body)).content == "hi"
            sessions = list(client._transport._sessions)  # type: ignore[attr-defined]
    assert sessions == [tuple(_fixed_set(server.port, 0)[1:-1])]
    for index, body in enumerate((short, longer)):
        assert server.seen(index) == _fixed_set(server.port, len(orjson.dumps(body)))


@on_asyncio
async def test_requests_with_other_headers_carry_their_own_and_no_defaults() -> None:
    """Beside a run's requests, a request with headers of its own, or a fixed set naming
    another Host, is sent with exactly its headers: the session defaults do not leak in."""
    async with WireServer(_ok()) as server:
        async with Client(
            f"http://127.0.0.1:{server.port}", api_key=KEY, max_connections=1
        ) as client:
            await client.send(CHAT)
            transport = client._transport
            other = httpx.Request("POST", client.url, headers={"x-other": "1"}, content=b"{}")
            elsewhere = client._request(b"{}")
            moved = httpx.Headers(elsewhere.headers)
            moved["host"] = "proxied.example"
            elsewhere.headers = FixedHeaders(moved)
            for request in (other, elsewhere):
                response = await transport.handle_async_request(request)
                await response.aread()
                await response.aclose()
    own = dict(server.seen(1))
    assert own["x-other"] == "1" and own["content-length"] == "2"
    assert "authorization" not in own and own["user-agent"] != USER_AGENT  # aiohttp's
    assert server.seen(2) == [("host", "proxied.example"), *_fixed_set(server.port, 2)[1:]]


@on_asyncio
async def test_a_plain_answer_is_read_whole_from_our_transport_else_through_httpx(
    fake: FakeServer,
) -> None:
    """Our transport answers a plain request in one call (`WholeAnswers`), with aiohttp's
    own header mapping; httpx's pool is read through its `httpx.Response` (`ReadWhole`) —
    the same completion either way."""
    completions = []
    for name in ("aiohttp", "httpx"):
        async with Client(fake.base_url, api_key=None, max_connections=1, transport=name) as client:
            completions.append(await client.send(CHAT))
            whole: object = client._answers
            assert (whole is client._transport) == (name == "aiohttp")
            assert isinstance(whole, ReadWhole) == (name == "httpx")
    ours, theirs = completions
    assert ours.headers is not None and theirs.headers is not None
    assert not isinstance(ours.headers, httpx.Headers) and isinstance(theirs.headers, httpx.Headers)
    assert ours.headers["Content-Type"] == theirs.headers["Content-Type"] == "application/json"
    assert (ours.content, ours.prompt_tokens) == (theirs.content, theirs.prompt_tokens)


@on_asyncio
async def test_a_429_read_whole_keeps_its_headers_as_httpx_reads_them() -> None:
    """A 429's headers come out as `httpx.Headers` (a repeated header joined), its
    Retry-After read from them, as through an `httpx.Response`."""
    limited = orjson.dumps({"error": {"message": "slow down"}})
    answer = _ok(
        limited, "Retry-After: 7", "X-Note: a", "X-Note: b", "X-Msg: trop de requêtes"
    ).replace(b"200 OK", b"429 Too Many Requests")
    async with WireServer(answer) as server:
        async with Client(
            f"http://127.0.0.1:{server.port}", api_key=KEY, max_connections=1
        ) as client:
            with pytest.raises(RateLimited, match="HTTP 429: slow down") as caught:
                await client.send(CHAT)
    headers = caught.value.headers
    assert isinstance(headers, httpx.Headers) and headers["x-note"] == "a, b"
    assert headers["x-msg"] == "trop de requêtes"  # UTF-8 on the wire, read as httpx reads it
    assert caught.value.retry_after == 7.0


@on_asyncio
async def test_a_broken_gzip_answer_read_whole_is_a_network_error() -> None:
    """A body that says it is gzip and is not fails in httpx's decoder, as it did when
    httpx read the response: a retryable network error, not JSON of garbage."""
    async with WireServer(_ok(b"not gzip", "Content-Encoding: gzip")) as server:
        async with Client(
            f"http://127.0.0.1:{server.port}", api_key=KEY, max_connections=1
        ) as client:
            with pytest.raises(RetryableError, match="network error") as caught:
                await client.send(CHAT)
    assert caught.value.error_class == "network"


@on_asyncio
async def test_through_a_proxy_each_request_carries_its_own_headers_and_the_key_stays_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp merges a session's default headers into a proxy's: with a proxy, the fixed
    set is not made a session's defaults, so the key goes to the API only (as Authorization)
    and the proxy is sent no Proxy-Authorization made of it."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    async with WireServer(_ok()) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        async with Client("http://api.example.invalid", api_key=KEY, max_connections=1) as client:
            assert (await client.send(CHAT)).content == "hi"
    seen = dict(proxy.seen())
    assert seen.pop("authorization") == f"Bearer {KEY}"
    assert "proxy-authorization" not in seen and KEY not in str(seen)


@on_asyncio
async def test_fixed_sets_past_the_sessions_cap_are_sent_with_their_own_headers() -> None:
    """A transport shared by more distinct fixed sets than `MAX_SESSIONS` sends the ones past
    the cap with their headers given each request: every request answered, each with its
    own set on the wire."""
    async with WireServer(_ok()) as server:
        transport = AiohttpTransport(
            max_connections=1, keepalive_expiry=5.0, verify=ssl.create_default_context()
        )
        url = f"http://127.0.0.1:{server.port}/chat/completions"
        try:
            for agent in range(MAX_SESSIONS + 1):
                headers = httpx.Headers(_fixed_set(server.port, 2))
                headers["user-agent"] = f"agent-{agent}"
                request = httpx.Request("POST", url, stream=httpx.ByteStream(b"{}"))
                request.headers = FixedHeaders(headers)
                status, _, body = await transport.answer_whole(request)
                assert status == 200 and body == ANSWER
        finally:
            await transport.aclose()
    for agent in range(MAX_SESSIONS + 1):
        assert dict(server.seen(agent))["user-agent"] == f"agent-{agent}"

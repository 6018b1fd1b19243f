"""The send path's fast ways (issue 12), each beside the slow way it must still take."""

from __future__ import annotations

import asyncio
import time

import anyio
import httpx
import orjson
import pytest

from batchrun.client import Client, FixedHeaders
from batchrun.deadline import Deadlines
from batchrun.errors import RetryableError
from batchrun.fake import FakeServer

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
        deadlines = client._deadlines
        assert not deadlines._due and not deadlines._expired
    assert deadlines._timer is None


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
    assert not client._deadlines._due


@on_asyncio
async def test_a_cancellation_from_elsewhere_wins_over_a_passed_deadline() -> None:
    """When the deadline passes as something else cancels the task, the CancelledError goes
    on: the task was cancelled, not merely timed out."""
    deadlines = Deadlines(0.0)
    seen: list[bool] = []

    async def attempt() -> None:
        task = asyncio.current_task()
        assert task is not None
        cancelling = deadlines.start(task)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append(deadlines.expired(task, cancelling))
            raise
        finally:
            deadlines.stop(task)

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0)  # in the attempt, its deadline (now) about to fire
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False]
    deadlines.close()


@on_asyncio
async def test_a_passed_deadline_alone_is_taken_back() -> None:
    deadlines = Deadlines(0.01)
    seen: list[tuple[bool, int]] = []

    async def attempt() -> None:
        task = asyncio.current_task()
        assert task is not None
        cancelling = deadlines.start(task)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append((deadlines.expired(task, cancelling), task.cancelling()))
        finally:
            deadlines.stop(task)

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

    async def attempt() -> bool:
        task = asyncio.current_task()
        assert task is not None
        cancelling = deadlines.start(task)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return deadlines.expired(task, cancelling)
        finally:
            deadlines.stop(task)
        return False

    async def leave_a_timer() -> None:
        task = asyncio.current_task()
        assert task is not None
        deadlines.start(task)
        deadlines.stop(task)  # the timer stays armed on this loop, which then closes

    asyncio.run(leave_a_timer())
    assert asyncio.run(attempt()) is True

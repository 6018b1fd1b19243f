"""An httpx transport over aiohttp (one pool), doing per request only what a batch run needs.

httpx stays the client API: `client.py` builds `httpx.Request`s and hands them to a transport's
`handle_async_request` (a streamed answer) or `answer_whole` (a plain one, `WholeAnswers`).
Unlike the general `httpx_aiohttp.AiohttpTransport`, this one builds its timeouts and parses
its URL once a run rather than once a request, keeps no cookie jar, maps aiohttp's errors to
httpx's only when one is raised (the same mapping as httpx-aiohttp's), gives a run's fixed
headers to aiohttp once (`FixedHeaders`) and hands a plain answer back whole in one call
(`WholeAnswers`), with no `httpx.Response` made for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

import httpx

if TYPE_CHECKING:
    import ssl

    import aiohttp
    from yarl import URL

CHUNK_SIZE = 16 * 1024


def _reraise_mapped() -> NoReturn:
    """Re-raise the aiohttp error being handled as httpx's (its `__cause__` the original)."""
    from httpx_aiohttp.transport import map_aiohttp_exceptions

    with map_aiohttp_exceptions():
        raise  # called from an `except` block: re-raises what it caught
    raise AssertionError("unreachable")  # pragma: no cover


#: an answer read whole: its status, its headers (case-insensitive) and its body, decoded
WholeAnswer = tuple[int, Mapping[str, str], bytes]


@runtime_checkable
class WholeAnswers(Protocol):
    """A transport that can send a plain (not streamed) request and hand back its whole
    answer in one call, with no `httpx.Response` made for it (issue 12). `Client` checks for
    it once a run; any other transport is read through `ReadWhole`."""

    async def answer_whole(self, request: httpx.Request) -> WholeAnswer:
        """Send `request` and read its answer to the end (the connection back in the pool).

        Raises httpx's errors, as `handle_async_request` and reading the response would."""
        ...


class ReadWhole:
    """Any httpx transport as `WholeAnswers`: its response read to the end and closed."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def answer_whole(self, request: httpx.Request) -> WholeAnswer:
        response = await self._transport.handle_async_request(request)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.headers, body


class FixedHeaders(httpx.Headers):
    """A request's header set that never changes once made, shared by the requests of a run
    with the same body length: the forms the transports read are worked out once, not once
    a request (issue 12): `multi_items` and `raw` (httpcore), and for `AiohttpTransport` the
    set split into what aiohttp writes itself from a request's URL and body (Host,
    Content-Length) and the rest, which an aiohttp session can hold as its defaults.

    Changing it raises TypeError; `httpx.Headers(fixed)` is a changeable copy.
    """

    def __init__(self, headers: httpx.Headers) -> None:
        super().__init__(headers, encoding=headers.encoding)
        self._multi_items = super().multi_items()
        self._raw = super().raw
        #: the Host header, if the set has one
        self.host = self.get("host")
        length = self.get("content-length")
        #: the Content-Length header's number, if the set has a plain one
        self.length = int(length) if length is not None and length.isdecimal() else None
        #: every header but those two, in order (names in lower case, as `multi_items`)
        self.common = tuple(
            (name, value)
            for name, value in self._multi_items
            if name != "host" and name != "content-length"
        )

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        return list(self._raw)

    def multi_items(self) -> list[tuple[str, str]]:
        return list(self._multi_items)

    def _fixed(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a request's FixedHeaders cannot change; change a copy: httpx.Headers()")

    __setitem__ = __delitem__ = update = _fixed


class _Body(httpx.AsyncByteStream):
    """An aiohttp answer's body as httpx's stream."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except Exception:
            _reraise_mapped()

    async def aclose(self) -> None:
        # back to the pool if the body was read to its end, else the connection is closed
        self._response.release()


_NO_HEADERS = httpx.Headers()
#: the extensions of the commonest answers (httpx.Response copies the dict it is given)
_EXTENSIONS: dict[str | None, dict[str, bytes]] = {
    "OK": {"http_version": b"HTTP/1.1", "reason_phrase": b"OK"}
}


class _Answer(httpx.Response):
    """An aiohttp answer as an `httpx.Response` whose `headers` are made from aiohttp's only
    when first read (a streamed answer's are read once; issue 12)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        extensions = _EXTENSIONS.get(response.reason)
        if extensions is None:
            extensions = {"http_version": b"HTTP/1.1"}
            if response.reason:
                extensions["reason_phrase"] = response.reason.encode()
        super().__init__(
            response.status,
            headers=_NO_HEADERS,  # cheaper for httpx to copy than None (two ABC checks)
            stream=_Body(response),
            request=request,
            extensions=extensions,
        )
        self._raw_headers: tuple[tuple[bytes, bytes], ...] | None = response.raw_headers

    @property
    def headers(self) -> httpx.Headers:
        raw = self._raw_headers
        if raw is not None:  # the first read: httpx's headers from aiohttp's
            self._raw_headers = None
            self._headers = httpx.Headers(raw)
        return self._headers

    @headers.setter
    def headers(self, value: httpx.Headers) -> None:
        self._raw_headers = None
        self._headers = value


#: aiohttp sessions with default headers made at most, one a distinct `FixedHeaders.common`
#: (a run has one; more fall back to headers given with each request)
MAX_SESSIONS = 8


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests over aiohttp (its sessions made on first use, in the loop).

    A request whose headers are a `FixedHeaders` matching its URL and body goes through a
    session holding the set's common headers as its defaults: aiohttp then merges no
    per-request headers into them (~4 us a request) and writes Host and Content-Length
    itself, the same values. Any other request carries its headers through a session with
    none. The sessions share one connection pool.

    Args:
        max_connections: connections in the pool at most.
        keepalive_expiry: seconds an idle connection is kept.
        verify: the TLS context.
        proxy: a proxy for every request, or None.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float | None,
        verify: ssl.SSLContext,
        proxy: httpx.Proxy | None = None,
    ) -> None:
        # here, not at the top: `import batchrun.client` stays light; and without the CA
        # roots aiohttp would load at import (our own context is handed to it)
        from batchrun.lazy_aiohttp import import_aiohttp

        import_aiohttp()
        import aiohttp

        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl = verify
        #: what every request passes besides its own URL, headers, body and timeouts: the
        #: proxy's arguments only when there is a proxy (fewer arguments, less binding)
        self._options: dict[str, Any] = {"allow_redirects": False}
        self._proxy = proxy
        if proxy is not None:
            self._options["proxy"] = str(proxy.url)
            self._options["proxy_headers"] = dict(proxy.headers)
            if proxy.auth:
                self._options["proxy_auth"] = aiohttp.BasicAuth(*proxy.auth)
        self._connector: aiohttp.TCPConnector | None = None
        #: the sessions by the default headers they hold: () for the one with none
        self._sessions: dict[tuple[tuple[str, str], ...], aiohttp.ClientSession] = {}
        #: the last URL sent to: its httpx form, its parts, its parsed form and the Host
        #: aiohttp writes for it (a run sends to one URL)
        self._url: tuple[httpx.URL, tuple[bytes, bytes, bytes], URL, str | None] | None = None
        self._last_timeout: tuple[dict[str, float | None], aiohttp.ClientTimeout] | None = None

    def _session(self, defaults: tuple[tuple[str, str], ...]) -> aiohttp.ClientSession | None:
        """The session holding `defaults` as its default headers, made on first use; None
        once `MAX_SESSIONS` are made."""
        session = self._sessions.get(defaults)
        if session is not None:
            return session
        if defaults and len(self._sessions) >= MAX_SESSIONS:
            return None  # the session without defaults () is always made
        import aiohttp

        connector = self._connector
        if connector is None:
            connector = self._connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                keepalive_timeout=self._keepalive_expiry,
                ssl=self._ssl,
            )
        # no cookie jar: cookies mean nothing to a batch run, and a jar is work every request;
        # no decompression by aiohttp: httpx decodes what is compressed
        session = aiohttp.ClientSession(
            connector=connector,
            connector_owner=False,  # closed by aclose, after every session
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            headers=defaults or None,
        )
        self._sessions[defaults] = session
        return session

    def _yarl(self, url: httpx.URL) -> tuple[URL, str | None]:
        """The URL parsed by yarl, and the Host header aiohttp writes for it."""
        cached = self._url
        if cached is not None and cached[0] is url:  # the client's own URL (`Client._request`)
            return cached[2], cached[3]
        # else by parts, not identity: httpx.Request copies the URL it is given
        key = (url.raw_scheme, url.netloc, url.raw_path)  # netloc: the host and the port
        if cached is not None and cached[1] == key:
            return cached[2], cached[3]
        from yarl import URL

        parsed = URL(str(url), encoded=True)
        self._url = (url, key, parsed, parsed.host_port_subcomponent)
        return parsed, self._url[3]

    def _timeout(self, given: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        """httpx's timeouts as httpx-aiohttp maps them; the last ones again when equal (a
        run's requests all carry the same: a dict comparison, made once a run)."""
        last = self._last_timeout
        if last is not None and last[0] == given:
            return last[1]
        import aiohttp

        timeout = aiohttp.ClientTimeout(
            sock_connect=given.get("connect"),
            sock_read=given.get("read"),
            connect=given.get("pool"),
        )
        self._last_timeout = (dict(given), timeout)
        return timeout

    def _send(self, request: httpx.Request) -> Awaitable[aiohttp.ClientResponse]:
        """aiohttp's request for `request`, to be awaited for its `ClientResponse`."""
        url, host = self._yarl(request.url)
        headers = request.headers
        data: bytes | httpx.AsyncByteStream | None
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            # a body in memory, read or not: its bytes without `request.read()`'s checks
            data = b"".join(stream)
            if (
                type(headers) is FixedHeaders
                and headers.length == len(data)
                and headers.host == host
                # aiohttp merges a session's default headers into a proxy's too: the key
                # would reach the proxy (as Proxy-Authorization); with one, each request
                # carries its own headers
                and self._proxy is None
            ):
                session = self._session(headers.common)
                if session is not None:  # the rest of the set is the session's defaults
                    return self._call(session, request, url, None, data or None)
            data = data or None
        else:
            try:
                data = request.content or None
            except httpx.RequestNotRead:
                data = stream  # type: ignore[assignment]  # an async client's stream
                headers.pop("transfer-encoding", None)  # aiohttp frames it itself
        session = self._session(())
        assert session is not None  # the first made
        return self._call(session, request, url, headers.multi_items(), data)

    def _call(
        self,
        session: aiohttp.ClientSession,
        request: httpx.Request,
        url: URL,
        headers: list[tuple[str, str]] | None,
        data: bytes | httpx.AsyncByteStream | None,
    ) -> Awaitable[aiohttp.ClientResponse]:
        extensions = request.extensions
        options = self._options
        server_hostname = extensions.get("sni_hostname")
        if server_hostname is not None:
            options = {**options, "server_hostname": server_hostname}
        return session.request(
            request.method,
            url,
            headers=headers,
            data=data,
            timeout=self._timeout(extensions.get("timeout", {})),
            **options,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._send(request)
        except Exception:
            _reraise_mapped()
        return _Answer(response, request)

    async def answer_whole(self, request: httpx.Request) -> WholeAnswer:
        """`WholeAnswers`: the body taken in one read; a compressed one decoded by httpx's
        decoders, as `handle_async_request`'s response would be."""
        try:
            response = await self._send(request)
        except Exception:
            _reraise_mapped()
        try:
            body = await response.read()
        except Exception:
            _reraise_mapped()
        finally:
            response.release()  # back to the pool if read to its end, else closed
        status = response.status
        headers: Mapping[str, str] = response.headers
        if status != 200:
            # an error's headers as httpx reads them (a repeated header joined, bytes that
            # are not ASCII kept): a 429's go on to the limiter in `RateLimited`
            headers = httpx.Headers(response.raw_headers)
        if "content-encoding" in headers:
            body = httpx.Response(status, headers=response.raw_headers, content=body).content
        return status, headers, body

    async def aclose(self) -> None:
        # the pool detached first: a send starting while these close makes a new one
        connector, self._connector = self._connector, None
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await session.close()
        if connector is not None:
            await connector.close()

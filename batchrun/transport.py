"""An httpx transport over one aiohttp session, doing per request only what a batch run needs.

httpx stays the client API: `client.py` builds `httpx.Request`s and reads `httpx.Response`s.
Unlike the general `httpx_aiohttp.AiohttpTransport`, this one builds its timeouts and parses
its URL once a run rather than once a request, keeps no cookie jar, maps aiohttp's errors to
httpx's only when one is raised (the same mapping as httpx-aiohttp's), and lets a plain answer
be read in one call (`read_body`) rather than through an async generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import httpx

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping

    import aiohttp
    from yarl import URL

CHUNK_SIZE = 16 * 1024


def _reraise_mapped() -> NoReturn:
    """Re-raise the aiohttp error being handled as httpx's (its `__cause__` the original)."""
    from httpx_aiohttp.transport import map_aiohttp_exceptions

    with map_aiohttp_exceptions():
        raise  # called from an `except` block: re-raises what it caught
    raise AssertionError("unreachable")  # pragma: no cover


class WholeBody(httpx.AsyncByteStream):
    """A response stream that can also hand over the whole body in one call, and the
    answer's headers as the transport parsed them."""

    async def read(self) -> bytes:
        raise NotImplementedError

    def header_map(self) -> Mapping[str, str]:
        """The answer's headers, case-insensitive: the transport's own mapping, cheaper to
        read than the `httpx.Headers` built from them (issue 12)."""
        raise NotImplementedError

    def encoded(self) -> bool:
        """Whether the body is compressed (then httpx must decode it)."""
        return "content-encoding" in self.header_map()


class _Body(WholeBody):
    """An aiohttp answer's body as httpx's stream; `read` takes it whole in one call."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except Exception:
            _reraise_mapped()

    def header_map(self) -> Mapping[str, str]:
        return self._response.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except Exception:
            _reraise_mapped()

    async def aclose(self) -> None:
        # back to the pool if the body was read to its end, else the connection is closed
        self._response.release()


async def read_body(response: httpx.Response) -> bytes:
    """The whole body of an answer: in one call from this transport's answers unless it is
    compressed, else through httpx (its decoders)."""
    stream = response.stream
    if isinstance(stream, WholeBody) and not stream.encoded():
        return await stream.read()
    return await response.aread()


async def close_body(response: httpx.Response) -> None:
    """Close an answer's stream: this transport's directly (httpx's `aclose` adds a context
    manager a request for its error messages), any other through httpx."""
    stream = response.stream
    if isinstance(stream, WholeBody):
        await stream.aclose()
    else:
        await response.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests over one aiohttp session (made on first use, in the loop).

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
        self._proxy = str(proxy.url) if proxy is not None else None
        self._proxy_auth = aiohttp.BasicAuth(*proxy.auth) if proxy and proxy.auth else None
        self._proxy_headers = dict(proxy.headers) if proxy is not None else None
        self._session: aiohttp.ClientSession | None = None
        #: the last URL sent to (its parts) and its parsed form: a run sends to one URL
        self._url: tuple[tuple[bytes, bytes, int | None, bytes], URL] | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive_expiry,
            ssl=self._ssl,
        )
        # no cookie jar: cookies mean nothing to a batch run, and a jar is work every request
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self._session

    def _yarl(self, url: httpx.URL) -> URL:
        # keyed by parts, not by identity: httpx.Request copies the URL it is given
        key = (url.raw_scheme, url.raw_host, url.port, url.raw_path)
        cached = self._url
        if cached is not None and cached[0] == key:
            return cached[1]
        from yarl import URL

        parsed = URL(str(url), encoded=True)
        self._url = (key, parsed)
        return parsed

    def _timeout(self, given: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        key = (given.get("connect"), given.get("read"), given.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:  # httpx's timeouts as httpx-aiohttp maps them
            import aiohttp

            timeout = aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1], connect=key[2])
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        data: bytes | httpx.AsyncByteStream | None
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # type: ignore[assignment]  # an async client's stream
            request.headers.pop("transfer-encoding", None)  # aiohttp frames it itself
        url, timeout = self._yarl(request.url), self._timeout(request.extensions.get("timeout", {}))
        try:
            response = await session.request(
                request.method,
                url,
                headers=request.headers.multi_items(),
                data=data,
                allow_redirects=False,
                auto_decompress=False,  # httpx decodes what is compressed
                compress=False,
                timeout=timeout,
                server_hostname=request.extensions.get("sni_hostname"),
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
                proxy_headers=self._proxy_headers,
            )
        except Exception:
            _reraise_mapped()
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

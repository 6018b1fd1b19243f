"""An httpx transport over one aiohttp session, doing per request only what a batch run needs.

httpx stays the client API: `client.py` builds `httpx.Request`s and reads `httpx.Response`s.
Unlike the general `httpx_aiohttp.AiohttpTransport`, this one builds its timeouts and parses
its URL once a run rather than once a request, keeps no cookie jar, maps aiohttp's errors to
httpx's only when one is raised (the same mapping as httpx-aiohttp's), and lets a plain answer
be read in one call (`WholeBody.read`) rather than through an async generator.
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


_NO_HEADERS = httpx.Headers()
#: the extensions of the commonest answers (httpx.Response copies the dict it is given)
_EXTENSIONS: dict[str | None, dict[str, bytes]] = {
    "OK": {"http_version": b"HTTP/1.1", "reason_phrase": b"OK"}
}


class _Answer(httpx.Response):
    """An aiohttp answer as an `httpx.Response` whose `headers` are made from aiohttp's only
    when first read: `client.py` reads a plain answer's headers from aiohttp's own mapping
    (`WholeBody.header_map`), so most answers never need httpx's copy (issue 12)."""

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
        #: what every request passes besides its own URL, headers, body and timeouts: the
        #: proxy's arguments only when there is a proxy (fewer arguments, less binding)
        self._options: dict[str, Any] = {"allow_redirects": False}
        if proxy is not None:
            self._options["proxy"] = str(proxy.url)
            self._options["proxy_headers"] = dict(proxy.headers)
            if proxy.auth:
                self._options["proxy_auth"] = aiohttp.BasicAuth(*proxy.auth)
        self._session: aiohttp.ClientSession | None = None
        #: the last URL sent to (its parts) and its parsed form: a run sends to one URL
        self._url: tuple[tuple[bytes, bytes, bytes], URL] | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}
        self._last_timeout: tuple[dict[str, float | None], aiohttp.ClientTimeout] | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive_expiry,
            ssl=self._ssl,
        )
        # no cookie jar: cookies mean nothing to a batch run, and a jar is work every request;
        # no decompression by aiohttp: httpx decodes what is compressed
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )
        return self._session

    def _yarl(self, url: httpx.URL) -> URL:
        # keyed by parts, not by identity: httpx.Request copies the URL it is given
        key = (url.raw_scheme, url.netloc, url.raw_path)  # netloc: the host and the port
        cached = self._url
        if cached is not None and cached[0] == key:
            return cached[1]
        from yarl import URL

        parsed = URL(str(url), encoded=True)
        self._url = (key, parsed)
        return parsed

    def _timeout(self, given: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        """httpx's timeouts as httpx-aiohttp maps them; the last ones again when equal (a
        run's requests all carry the same: a dict comparison, not a lookup)."""
        last = self._last_timeout
        if last is not None and last[0] == given:
            return last[1]
        key = (given.get("connect"), given.get("read"), given.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            import aiohttp

            timeout = aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1], connect=key[2])
            self._timeouts[key] = timeout
        self._last_timeout = (dict(given), timeout)
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        data: bytes | httpx.AsyncByteStream | None
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            # a body in memory, read or not: its bytes without `request.read()`'s checks
            data = b"".join(stream) or None
        else:
            try:
                data = request.content or None
            except httpx.RequestNotRead:
                data = stream  # type: ignore[assignment]  # an async client's stream
                request.headers.pop("transfer-encoding", None)  # aiohttp frames it itself
        extensions = request.extensions
        options = self._options
        server_hostname = extensions.get("sni_hostname")
        if server_hostname is not None:
            options = {**options, "server_hostname": server_hostname}
        try:
            response = await session.request(
                request.method,
                self._yarl(request.url),
                headers=request.headers.multi_items(),
                data=data,
                timeout=self._timeout(extensions.get("timeout", {})),
                **options,
            )
        except Exception:
            _reraise_mapped()
        return _Answer(response, request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

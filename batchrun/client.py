"""One HTTP client for a run: send a request body, get a `Completion` or a classified error.

Errors are classified from the status code and JSON fields, never from message text. Each
attempt has its own total deadline on top of httpx's per-read timeout, because DeepSeek's
keep-alive blank lines restart the read timer for up to ten minutes.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import httpx
import orjson

from batchrun.deadline import Deadlines
from batchrun.errors import (
    AuthError,
    BalanceError,
    ConfigError,
    ConnectFailed,
    KeyWanted,
    NotAnEndpoint,
    PermanentError,
    RateLimited,
    RetryableError,
)
from batchrun.limits import parse_duration
from batchrun.logs import MIN_SECRET_LENGTH
from batchrun.sse import StreamAccumulator, StreamBroken
from batchrun.transport import (
    AiohttpTransport,
    FixedHeaders,
    ReadWhole,
    WholeAnswers,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping

USER_AGENT = "batchrun/0.1"
RETRYABLE_STATUS = frozenset({408, 409, 425, 500, 502, 503, 504})
PERMANENT_CLASSES = {400: "bad_request", 404: "not_found", 413: "too_large", 422: "invalid_params"}
#: plain-text 500s answering the first requests sent without a key, before they are taken to
#: mean that the server wants one (some local servers answer a missing key so; a 502/503
#: page is an overloaded or restarting server, not a refusal)
KEYLESS_REFUSALS = 3


@dataclass(slots=True)
class Completion:
    """A successful answer, with the usage the server reported (None where it sent none)."""

    content: str | None
    reasoning_content: str | None
    finish_reason: str | None
    model: str | None
    response_id: str | None
    http_status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_cache_hit_tokens: int | None = None
    prompt_cache_miss_tokens: int | None = None
    reasoning_tokens: int | None = None
    headers: Mapping[str, str] | None = None


def chat_url(base_url: str) -> str:
    """`{base}/chat/completions`, whether the base ends in `/`, `/v1` or the full path."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + "/chat/completions"


def _count(value: Any) -> int | None:
    """A count of an answer's usage; anything but an int (a bool, a string) is None."""
    return value if type(value) is int else None


def _text(value: Any) -> str | None:
    """A string field of an answer; a proxy's number or object is kept as its text."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)


def _fill_usage(completion: Completion, usage: Any) -> None:
    if type(usage) is not dict:
        return
    get = usage.get
    completion.prompt_tokens = _count(get("prompt_tokens"))
    completion.completion_tokens = _count(get("completion_tokens"))
    completion.total_tokens = _count(get("total_tokens"))
    completion.prompt_cache_hit_tokens = _count(get("prompt_cache_hit_tokens"))
    completion.prompt_cache_miss_tokens = _count(get("prompt_cache_miss_tokens"))
    details = get("completion_tokens_details")
    if type(details) is dict:
        completion.reasoning_tokens = _count(details.get("reasoning_tokens"))


#: vendor headers that carry a plain delay in seconds, as Retry-After does (LiteLLM's proxy)
VENDOR_RETRY_HEADERS = ("llm_provider-retry-after",)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from the first header that says:

    `retry-after-ms`; `Retry-After` in seconds or as an HTTP date; a vendor header such as
    `llm_provider-retry-after`; else `x-ratelimit-reset-requests` / `-tokens` (seconds or a
    Go duration such as `6m0s`): the one whose `remaining` is 0, or the later of the two when
    neither says which limit was hit.
    """
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        seconds = _http_delay(value, now)
        if seconds is not None:
            return seconds
    for name in VENDOR_RETRY_HEADERS:
        value = headers.get(name)
        if value:
            seconds = _http_delay(value, now)
            if seconds is not None:
                return seconds
    return _reset_delay(headers)


def _http_delay(value: str, now: float | None) -> float | None:
    """A Retry-After value: seconds, or an HTTP date."""
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


def _reset_delay(headers: Mapping[str, str]) -> float | None:
    resets: dict[str, float] = {}
    exhausted: list[str] = []
    told = False  # whether any remaining-* header says how much is left
    for kind in ("requests", "tokens"):
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", "") or "")
        if reset is not None:
            resets[kind] = reset
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is not None:
            told = True
            if remaining.strip() in ("0", "0.0"):
                exhausted.append(kind)
    if exhausted:
        chosen = [resets[kind] for kind in exhausted if kind in resets]
    else:  # with room left in both, the 429 is some other limit's: no reset applies
        chosen = [] if told else list(resets.values())
    return max(chosen) if chosen else None


def _error_message(status: int, body: bytes) -> str:
    """The server's own message where its body has one, else a short excerpt."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return f"HTTP {status}: {error['message']}"
        if isinstance(error, str):
            return f"HTTP {status}: {error}"
        if isinstance(data.get("message"), str):
            return f"HTTP {status}: {data['message']}"
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _connect_failure(exc: BaseException) -> bool:
    """Whether a transport error happened before the request left: no connection was made.

    The aiohttp transport maps every dropped connection to `ConnectTimeout` too, so there
    the original aiohttp error (the `__cause__`) decides.
    """
    if isinstance(exc, httpx.ConnectError):
        return True
    if not isinstance(exc, httpx.ConnectTimeout):
        return False
    cause = exc.__cause__
    if cause is None:
        return True  # httpx's own transport: a real connect timeout
    import sys

    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(
        cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
    )


def _completion_from_body(data: Any, status: int) -> Completion:
    """The completion in a 200's parsed body."""
    choices = data.get("choices") if type(data) is dict else None
    if type(choices) is not list:
        raise RetryableError(
            "the 200 answer is not a chat completion", status=status, error_class="bad_response"
        )
    choice: Any = choices[0] if choices else None
    message = choice.get("message") if type(choice) is dict else None
    if type(message) is not dict:
        raise RetryableError(
            "the 200 answer has no message in its first choice",
            status=status,
            error_class="bad_response",
        )
    completion = Completion(
        content=_text(message.get("content")),
        reasoning_content=_text(message.get("reasoning_content")),
        finish_reason=_text(choice.get("finish_reason")),
        model=_text(data.get("model")),
        response_id=_text(data.get("id")),
        http_status=status,
    )
    _fill_usage(completion, data.get("usage"))
    return completion


def _check_finish(completion: Completion) -> Completion:
    if completion.finish_reason == "insufficient_system_resource":
        raise RetryableError(
            "the server ran out of resources mid-answer (finish_reason "
            "insufficient_system_resource)",
            status=completion.http_status,
            error_class="server_busy",
        )
    return completion


def _transport_errors() -> tuple[type[BaseException], ...]:
    """aiohttp's own errors, when that transport is in use (it does not map them all)."""
    import sys

    aiohttp = sys.modules.get("aiohttp")
    return (aiohttp.ClientError,) if aiohttp is not None else ()


def _fixed_headers(url: httpx.URL, api_key: str | None) -> httpx.Headers:
    """The headers every request of a run carries, Host included; only Content-Length varies."""
    headers = {
        "host": url.netloc.decode("ascii"),
        "accept": "*/*",
        # gzip and deflate only: the standard library decodes them (httpx, when an answer is
        # compressed); keep-alive is HTTP/1.1's default and the transports pool connections
        "accept-encoding": "gzip, deflate",
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return httpx.Headers(headers)


def _environment_proxy(url: httpx.URL) -> httpx.Proxy | None:
    """The proxy `HTTP(S)_PROXY`/`ALL_PROXY` name for `url`, unless `NO_PROXY` exempts it:
    what httpx's client layer did for us before requests went to the transport directly."""
    import urllib.request

    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    # NO_PROXY may name the host alone or host:port (a local server on localhost:8000)
    if not proxy or urllib.request.proxy_bypass(f"{url.host}:{url.port}" if url.port else url.host):
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    if not proxy.startswith(("http://", "https://")):
        # sent as an HTTP proxy, a SOCKS one would see plain requests (the key with them)
        raise ConfigError(
            f"the environment names the proxy {proxy.split('://')[0]}://... (HTTP_PROXY, "
            "HTTPS_PROXY or ALL_PROXY): only HTTP proxies are supported; set NO_PROXY for "
            f"{url.host} or use an HTTP proxy"
        )
    return httpx.Proxy(proxy)


def _verify(url: httpx.URL, proxy: httpx.Proxy | None) -> ssl.SSLContext:
    """TLS verification as httpx does it by default (certifi's or `SSL_CERT_FILE`'s roots),
    except that plain-HTTP traffic (a local server, a fake) skips loading the roots, which
    it would never use: an empty context, verifying all the same."""
    if url.scheme == "http" and (proxy is None or proxy.url.scheme == "http"):
        import ssl

        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return httpx.create_ssl_context()


def make_transport(name: str, url: httpx.URL, *, max_connections: int) -> httpx.AsyncBaseTransport:
    """The transport a job names: `aiohttp` (`transport.AiohttpTransport`, the default) or
    `httpx`'s own pool."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    proxy = _environment_proxy(url)
    verify = _verify(url, proxy)
    if name == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits, proxy=proxy, verify=verify)
    return AiohttpTransport(
        max_connections=max_connections,
        keepalive_expiry=limits.keepalive_expiry,
        verify=verify,
        proxy=proxy,
    )


class Client:
    """Sends chat-completion requests through one httpx transport (aiohttp's pool by default).

    Use as an async context manager; `send` is safe to call from many tasks at once.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        key_variable: str = "",
        max_connections: int,
        timeout: float = 600.0,
        read_timeout: float = 120.0,
        transport: str | httpx.AsyncBaseTransport = "aiohttp",
    ) -> None:
        self.url = chat_url(base_url)
        #: every attempt's total deadline, on asyncio with our aiohttp transport (`send`)
        self.deadlines = Deadlines(timeout)
        #: a stream with no data for this long (keep-alive comments aside) has stalled
        self.stream_idle_limit = read_timeout
        self._api_key = api_key
        #: the variable the key comes from: a refusal of keyless requests names it
        self._key_variable = key_variable
        #: whether any request of this client has been answered with a 200
        self._answered = False
        self._keyless_refusals = 0
        # Built once a run, not once a request: a batch runner needs no cookie jar, base URL
        # merging or default headers per request, and httpx's client layer spends more CPU on
        # those than the transport spends sending (issue 12).
        self._url = httpx.URL(self.url)
        self._headers = _fixed_headers(self._url, api_key)
        self._header_encoding = self._headers.encoding
        #: the headers for each body length seen (httpx.Request copies what it is given)
        self._headers_by_length: dict[int, FixedHeaders] = {}
        http_timeout = httpx.Timeout(connect=30.0, read=read_timeout, write=60.0, pool=None)
        self._extensions: dict[str, Any] = {"timeout": http_timeout.as_dict()}
        if isinstance(transport, str):
            transport = make_transport(transport, self._url, max_connections=max_connections)
        self._transport = transport
        #: how a plain answer is read: in one call where the transport can (ours), else
        #: through its `httpx.Response`
        self._answers: WholeAnswers = (
            transport if isinstance(transport, WholeAnswers) else ReadWhole(transport)
        )
        #: the shared `Deadlines` serve our aiohttp transport only: a plain task.cancel()
        #: would break through httpcore's shielded connection clean-up, an anyio scope not
        self._own_deadlines = isinstance(transport, AiohttpTransport)
        self._network_errors: tuple[type[BaseException], ...] = (
            httpx.HTTPError,
            *_transport_errors(),
        )

    @property
    def timeout(self) -> float:
        """Seconds an attempt may take in all, keep-alive lines included."""
        return self.deadlines.seconds

    async def __aenter__(self) -> Client:
        await self._transport.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.deadlines.close()
        await self._transport.__aexit__(*exc_info)

    def _request(self, payload: bytes) -> httpx.Request:
        """The request for a body: the fixed headers with its length.

        `stream=` rather than `content=`: httpx then adds no headers of its own, which saves
        two header-list rebuilds a request (a third of the request's own cost in the client).
        """
        length = len(payload)
        headers = self._headers_by_length.get(length)
        if headers is None:  # bodies of a run come in few lengths: each set is made once
            each = httpx.Headers(self._headers)
            each["content-length"] = str(length)
            each.encoding = self._header_encoding  # worked out once, not per request
            headers = FixedHeaders(each)
            if len(self._headers_by_length) < 4096:
                self._headers_by_length[length] = headers
        request = httpx.Request(
            "POST", self._url, stream=httpx.ByteStream(payload), extensions=self._extensions
        )
        # the set itself rather than a copy of it (what `headers=` makes): the transports
        # read a request's headers and never change those of a body in memory; and the URL
        # itself (httpx.Request copies it): a transport may know it again by identity
        request.headers = headers
        request.url = self._url
        # not `request.read()`: the body is in memory already, and the transports take a
        # ByteStream's bytes as they are (aiohttp's here, httpcore's iterating it)
        return request

    def _redact(self, message: str) -> str:
        if self._api_key and len(self._api_key) >= MIN_SECRET_LENGTH and self._api_key in message:
            return message.replace(self._api_key, "[redacted]")
        return message

    def _refused(self, message: str) -> AuthError:
        # sent without a key (a loopback URL may go without): the server wants one, and the
        # log line of the run stopping should say so, not that a key was rejected
        if self._api_key is None and self._key_variable:
            return KeyWanted(self._key_variable, message)
        return AuthError(message)

    def _raise_for_status(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        message = self._redact(_error_message(status, body))
        if status == 401 or status == 403:
            raise self._refused(message)
        if status == 404 and (_json_object(body) or {}).get("error") is None:
            # an API's own 404 (an unknown model, say) has an error object; a wrong path
            # gets the web server's page, or a framework's {"detail": ...}
            raise NotAnEndpoint(f"{self.url} is not a chat-completions endpoint ({message})")
        if status == 500 and self._api_key is None and not self._answered:
            if _json_object(body) is None:
                self._keyless_refusals += 1
                if self._keyless_refusals >= KEYLESS_REFUSALS:
                    raise self._refused(message)
        if status == 402:
            raise BalanceError(message)
        if status == 429:
            raise RateLimited(message, retry_after=parse_retry_after(headers), headers=headers)
        if status in RETRYABLE_STATUS or status >= 500:
            raise RetryableError(message, status=status, error_class="server")
        raise PermanentError(
            message, status=status, error_class=PERMANENT_CLASSES.get(status, "client_error")
        )

    async def send(self, body: dict[str, Any]) -> Completion:
        """Send one request and return its completion.

        On asyncio with our aiohttp transport (every run by default) the attempt's deadline
        is the client's shared `Deadlines`: safe as a cancel scope is, since its cancellation
        is asyncio's own and is taken back here only when nothing else cancelled the task
        meanwhile. Elsewhere (trio, httpx's own pool) it is an anyio cancel scope
        (`_send_in_scope`).

        Raises:
            RetryableError: 429, 5xx, network faults, a deadline passed, a broken 200.
            PermanentError: 400, 404, 422 and other client errors.
            AuthError, BalanceError: 401/403 and 402; the run must stop.
        """
        payload = orjson.dumps(body)
        streaming = bool(body.get("stream"))
        task = None
        if self._own_deadlines:
            try:
                task = asyncio.current_task()
            except RuntimeError:  # not on asyncio
                pass
        try:
            if task is None:
                return await self._send_in_scope(payload, streaming)
            # written here rather than in a method of its own: one coroutine less a request
            deadlines = self.deadlines
            cancelling = deadlines.start(task)
            try:
                if streaming:
                    return await self._send_streaming(payload)
                return await self._send_plain(payload)
            except asyncio.CancelledError:
                if deadlines.expired(task, cancelling):
                    # an anyio scope cancelled in the same loop pass, after our deadline,
                    # leaves its task.cancel() for the next pass (the task was cancelled
                    # already): wait for it here so a stop is not reported as a timeout
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    raise TimeoutError from None
                raise
            finally:
                deadlines.stop(task)
        except TimeoutError:
            pass  # our deadline, or a library's own inside: the same outcome
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            detail = self._redact(str(exc)) or type(exc).__name__
            if _connect_failure(exc):
                raise ConnectFailed(detail) from None
            # the aiohttp transport reports a dropped connection as ConnectTimeout
            raise RetryableError(f"network error: {detail}", error_class="network") from None
        except httpx.TimeoutException as exc:
            raise RetryableError(
                f"timed out: {type(exc).__name__}", error_class="timeout"
            ) from None
        except self._network_errors as exc:
            # transport faults, bad encodings, and aiohttp errors the transport does not map
            detail = self._redact(str(exc)) or type(exc).__name__
            raise RetryableError(f"network error: {detail}", error_class="network") from None
        raise RetryableError(f"no complete answer within {self.timeout:g} s", error_class="timeout")

    async def _send_in_scope(self, payload: bytes, streaming: bool) -> Completion:
        """The attempt in an anyio cancel scope with the deadline: off asyncio (trio), or with
        a transport other than ours (`_own_deadlines`)."""
        # leaving the block without a return means the deadline passed
        with anyio.CancelScope(deadline=anyio.current_time() + self.timeout):
            if streaming:
                return await self._send_streaming(payload)
            return await self._send_plain(payload)
        raise TimeoutError

    async def _send_plain(self, payload: bytes) -> Completion:
        # the limiter reads a few headers of every answer: the transport's own mapping
        status, headers, body = await self._answers.answer_whole(self._request(payload))
        if status != 200:
            self._raise_for_status(status, headers, body)
        try:
            data = orjson.loads(body)  # leading keep-alive blank lines are JSON whitespace
        except orjson.JSONDecodeError:
            problem = "has an empty body" if not body.strip() else "is not valid JSON"
            raise RetryableError(
                f"the 200 answer {problem}", status=status, error_class="bad_response"
            ) from None
        completion = _completion_from_body(data, status)
        completion.headers = headers
        self._answered = True
        return _check_finish(completion)

    async def _send_streaming(self, payload: bytes) -> Completion:
        response = await self._transport.handle_async_request(self._request(payload))
        try:
            status = response.status_code
            if status != 200:
                self._raise_for_status(status, response.headers, await response.aread())
            stream = StreamAccumulator()
            last_data = anyio.current_time()
            try:
                async for line in response.aiter_lines():
                    stream.feed_line(line)
                    if stream.done:
                        break
                    now = anyio.current_time()
                    if line.startswith("data"):
                        last_data = now
                    elif now - last_data > self.stream_idle_limit:
                        # keep-alive comments restart httpx's read timer but are not progress
                        raise RetryableError(
                            f"the stream sent only keep-alives for over "
                            f"{self.stream_idle_limit:g} s",
                            status=status,
                            error_class="timeout",
                        )
                stream.finish()
            except StreamBroken as exc:
                raise RetryableError(
                    self._redact(str(exc)), status=status, error_class="bad_response"
                ) from None
        finally:
            await response.aclose()
        if not stream.done or stream.finish_reason is None:
            raise RetryableError(
                "the stream ended before [DONE] or without a finish_reason",
                status=status,
                error_class="bad_response",
            )
        completion = Completion(
            content=stream.content,
            reasoning_content=stream.reasoning_content,
            finish_reason=stream.finish_reason,
            model=stream.model,
            response_id=stream.response_id,
            http_status=status,
            headers=response.headers,
        )
        _fill_usage(completion, stream.usage)
        self._answered = True
        return _check_finish(completion)

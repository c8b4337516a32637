"""The upstream (Bifrost) client: one pooled client, timeouts, retry-once, error mapping.

``Upstream`` is the seam. Under it sits aiohttp's client by default (measured: the
pass-through throughput target is out of reach on httpx's default transport, see
README "Performance"), or httpx (``upstream_client = "httpx"``, with any httpx
transport, e.g. ``MockTransport`` in tests). Callers only see ``UpstreamResponse``,
and every failure becomes a ``ProxyError`` (502/504 in Bifrost's envelope) or, once
an answer is streaming, ``StreamBroken``: never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from yarl import URL

from . import h1, metrics
from .errors import NotSent, ProxyError
from .settings import Settings

log = logging.getLogger("proxy.upstream")


@dataclass(slots=True)
class UpstreamCall:
    method: str
    path: str  # already encoded, begins with "/"
    query: bytes
    headers: list[tuple[bytes, bytes]]
    content: bytes | AsyncIterator[bytes] | None = None
    retry_idempotent: bool = False  # GET retrieve/list may be retried once
    streaming: bool = False  # content downloads and pass-through: idle-read timeout
    route: str = "other"  # metric label: the route template


class UpstreamUnreachable(NotSent):
    """No connection to the upstream could be made: the request was never sent."""


class StreamBroken(Exception):
    """The upstream answer broke off after it had started (kind: a metric label)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class UpstreamResponse:
    """An upstream answer whose body is still unread, whichever client fetched it."""

    status_code: int
    raw_headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.raw_headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as received (no decompression); raises StreamBroken."""
        raise NotImplementedError

    async def read_whole(self, max_bytes: int) -> bytes:
        """The whole body (at most ``max_bytes``, else a 502); raises StreamBroken."""
        return await read_raw(self, max_bytes)

    async def aclose(self) -> None:
        raise NotImplementedError


class _AiohttpResponse(UpstreamResponse):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.raw_headers = list(response.raw_headers)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            # Each read as it arrived (at most aiohttp's buffer limit): re-cutting them
            # into fixed chunks copied every byte once more (a relayed 256 MiB download
            # 0.40 -> 0.51 of nginx's sendfile, measured side by side).
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise StreamBroken(error_kind(exc)) from None

    async def read_whole(self, max_bytes: int) -> bytes:
        # A small answer of a declared length (every JSON answer of Bifrost's) is read
        # in one call, not chunk by chunk through an async generator.
        length = self._response.content_length
        if length is None or length > max_bytes:
            return await read_raw(self, max_bytes)
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise StreamBroken(error_kind(exc)) from None

    async def aclose(self) -> None:
        # Fully read answers already returned their connection to the pool; anything
        # else closes it, so an abandoned download never pins a pooled connection.
        self._response.close()


class _HttpxResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.raw_headers = list(response.headers.raw)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise StreamBroken(error_kind(exc)) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class _Answered(UpstreamResponse):
    """An answer the lean client has read whole already."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code, self.raw_headers = status, headers

    async def aclose(self) -> None:
        pass


class _CleanPoolConnector(aiohttp.TCPConnector):
    """Never hands out a pooled connection that received bytes while idle.

    aiohttp parses whatever arrives on an idle keep-alive connection and queues it as
    the answer to the *next* request sent on it: an upstream that writes a stray
    response would have it served to (and cached for) another tenant's request.
    aiohttp already closes, on release, a connection with unread or unparsed bytes
    (``should_close``); this closes the ones that got bytes after release too.
    """

    async def _get(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            connection = await super()._get(*args, **kwargs)
            if connection is None:
                return None
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            log.debug("discarding a pooled upstream connection that received stray bytes")
            connection.close()


class Upstream:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self.base = settings.upstream_url.rstrip("/")
        self.total_timeout = settings.upstream_timeout_seconds
        self._use_httpx = transport is not None or settings.upstream_client == "httpx"
        if self._use_httpx:
            self._httpx = httpx.AsyncClient(
                transport=transport,
                # No keep-alive: h11 keeps bytes that arrive after an answer for the
                # next answer on the connection, and httpcore cannot be asked whether it
                # holds any, so a reused connection could serve a stray answer.
                limits=httpx.Limits(
                    max_connections=settings.upstream_max_connections,
                    max_keepalive_connections=0,
                ),
                follow_redirects=False,
                trust_env=False,
            )
        else:
            self._session = aiohttp.ClientSession(
                connector=_CleanPoolConnector(
                    limit=settings.upstream_max_connections, limit_per_host=0
                ),
                auto_decompress=False,  # relay bytes as sent: no double decompression
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        connect = settings.upstream_connect_timeout_seconds
        # Plain GETs read whole (retrieve, list) take the lean client (see h1.py).
        self._lean = (
            None
            if self._use_httpx
            else h1.LeanClient(settings.upstream_url, settings.upstream_max_connections)
        )
        self._connect_timeout = connect
        self._json_timeouts = (settings.upstream_timeout_seconds, connect, None)
        self._stream_timeouts = (None, connect, settings.content_timeout_seconds)
        # Built once: aiohttp's timeout objects are immutable.
        self._aiohttp_timeouts = {
            streaming: aiohttp.ClientTimeout(total=total, sock_connect=conn, sock_read=read)
            for streaming, (total, conn, read) in (
                (False, self._json_timeouts), (True, self._stream_timeouts)
            )
        }  # fmt: skip

    async def aclose(self) -> None:
        if self._lean is not None:
            self._lean.close()
        if self._use_httpx:
            await self._httpx.aclose()
        else:
            await self._session.close()

    def _url(self, call: UpstreamCall) -> str:
        url = self.base + call.path
        if call.query:
            url += "?" + call.query.decode("latin-1")
        return url

    async def _send(self, call: UpstreamCall) -> UpstreamResponse:
        total, connect, read = self._stream_timeouts if call.streaming else self._json_timeouts
        if self._use_httpx:
            timeout = httpx.Timeout(total or read, connect=connect, read=read or total)
            request = self._httpx.build_request(
                call.method, self._url(call), headers=call.headers, content=call.content,
                timeout=timeout,
            )  # fmt: skip
            sent = {name.lower() for name, _ in call.headers}
            for default in (b"accept", b"accept-encoding", b"user-agent"):
                if default not in sent:  # httpx's client defaults: not the caller's
                    del request.headers[default.decode()]
            return _HttpxResponse(await self._httpx.send(request, stream=True))
        # aiohttp writes header text as UTF-8; ``headers.forwardable`` let through only
        # ASCII and UTF-8 values, so decoding them as UTF-8 sends the client's bytes.
        headers = [(k.decode("latin-1"), v.decode("utf-8")) for k, v in call.headers]
        response = await self._session.request(
            call.method,
            URL(self._url(call), encoded=True),  # the path is already encoded: keep it
            headers=headers,
            data=call.content,
            allow_redirects=False,
            timeout=self._aiohttp_timeouts[call.streaming],
        )
        return _AiohttpResponse(response)

    async def open(self, call: UpstreamCall) -> UpstreamResponse:
        """Send the request; the answer's body is left unread (stream it or read it)."""
        attempts = 2 if call.retry_idempotent else 1
        started = time.perf_counter()
        for attempt in range(attempts):
            try:
                response = await self._send(call)
            except (TimeoutError, httpx.HTTPError, aiohttp.ClientError) as exc:
                # A pooled keep-alive connection the server had already closed fails
                # before any byte is received: safe to retry once for GET.
                if attempt + 1 < attempts and error_kind(exc) != "timeout":
                    log.debug("retrying %s after %s", call.method, type(exc).__name__)
                    continue
                metrics.UPSTREAM_ERRORS.labels(call.route, error_kind(exc)).inc()
                raise map_error(error_kind(exc), exc) from None
            if not 200 <= response.status_code <= 599:
                # Not a final answer the proxy can relay (a 101 switch, or a status out
                # of range): dropped unread, so its connection is closed.
                await response.aclose()
                metrics.UPSTREAM_ERRORS.labels(call.route, "protocol").inc()
                raise ProxyError(502, "upstream answered with an invalid status code")
            metrics.child(
                metrics.UPSTREAM_DURATION, call.route, call.method, str(response.status_code)
            ).observe(time.perf_counter() - started)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch(self, call: UpstreamCall, max_bytes: int) -> tuple[UpstreamResponse, bytes]:
        """Send and read the whole (raw, undecoded) body within the total timeout."""
        if self._lean is not None and call.method == "GET" and call.content is None:
            return await self._lean_fetch(call, max_bytes)
        # aiohttp's ClientTimeout(total=…) already bounds the whole exchange; httpx's
        # timeouts are per operation, so bound it here.
        try:
            if self._use_httpx:
                async with asyncio.timeout(self.total_timeout):
                    response, body = await self._open_and_read(call, max_bytes)
            else:
                response, body = await self._open_and_read(call, max_bytes)
        except TimeoutError:
            metrics.UPSTREAM_ERRORS.labels(call.route, "timeout").inc()
            raise ProxyError(504, "upstream timed out") from None
        except StreamBroken as exc:  # while reading the body
            metrics.UPSTREAM_ERRORS.labels(call.route, exc.kind).inc()
            raise map_error(exc.kind, exc) from None
        return response, body

    async def _lean_fetch(
        self, call: UpstreamCall, max_bytes: int
    ) -> tuple[UpstreamResponse, bytes]:
        """A plain GET on the lean client, under one deadline; errors mapped as for
        aiohttp's (the same statuses, messages and metrics)."""
        assert self._lean is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.total_timeout):
                status, headers, body = await self._lean.get(
                    call.path, call.query, call.headers, max_bytes, self._connect_timeout
                )
        except TimeoutError:
            metrics.UPSTREAM_ERRORS.labels(call.route, "timeout").inc()
            raise ProxyError(504, "upstream timed out") from None
        except h1.Refused:
            metrics.UPSTREAM_ERRORS.labels(call.route, "connect").inc()
            raise UpstreamUnreachable(
                502, "upstream unreachable: could not connect to Bifrost"
            ) from None
        except h1.TooLarge:
            raise ProxyError(502, f"upstream answer larger than {max_bytes} bytes") from None
        except h1.Broken as exc:
            metrics.UPSTREAM_ERRORS.labels(call.route, "protocol").inc()
            raise ProxyError(502, f"upstream protocol error: {exc}") from None
        if not 200 <= status <= 599:
            metrics.UPSTREAM_ERRORS.labels(call.route, "protocol").inc()
            raise ProxyError(502, "upstream answered with an invalid status code")
        metrics.child(metrics.UPSTREAM_DURATION, call.route, "GET", str(status)).observe(
            time.perf_counter() - started
        )
        return _Answered(status, headers), body

    async def _open_and_read(
        self, call: UpstreamCall, max_bytes: int
    ) -> tuple[UpstreamResponse, bytes]:
        response = await self.open(call)
        try:
            return response, await response.read_whole(max_bytes)
        finally:
            await response.aclose()


async def read_raw(response: UpstreamResponse, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise ProxyError(502, f"upstream answer larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_kind(exc: BaseException) -> str:
    """Metric label for a transport failure: connect, timeout or protocol."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect"
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return "connect"
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout"
    return "protocol"


def map_error(kind: str, exc: BaseException) -> ProxyError:
    if kind == "timeout":
        return ProxyError(504, f"upstream timed out ({type(exc).__name__})")
    if kind == "connect":
        return UpstreamUnreachable(502, "upstream unreachable: could not connect to Bifrost")
    return ProxyError(502, f"upstream protocol error: {type(exc).__name__}")

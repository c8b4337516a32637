"""The upstream (Bifrost) client: one pooled httpx client and error mapping.

httpx's API is the seam: tests drive it through real sockets or ``MockTransport``,
and the transport under it can be swapped for speed without touching callers.
Every transport failure becomes a ``ProxyError`` (502 or 504 in Bifrost's
envelope) naming the cause, never a 500.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx

from . import metrics
from .errors import ProxyError
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


class Upstream:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self.base = settings.upstream_url.rstrip("/")
        self.total_timeout = settings.upstream_timeout_seconds
        self._json_timeout = httpx.Timeout(
            settings.upstream_timeout_seconds, connect=settings.upstream_connect_timeout_seconds
        )
        self._stream_timeout = httpx.Timeout(
            settings.upstream_timeout_seconds,
            connect=settings.upstream_connect_timeout_seconds,
            read=settings.content_timeout_seconds,
        )
        limits = httpx.Limits(
            max_connections=settings.upstream_max_connections,
            max_keepalive_connections=settings.upstream_max_connections,
        )
        self.client = httpx.AsyncClient(
            transport=transport,
            limits=limits,
            timeout=self._json_timeout,
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _request(self, call: UpstreamCall) -> httpx.Request:
        url = self.base + call.path
        if call.query:
            url += "?" + call.query.decode("latin-1")
        return self.client.build_request(
            call.method,
            url,
            headers=call.headers,
            content=call.content,
            timeout=self._stream_timeout if call.streaming else self._json_timeout,
        )

    async def open(self, call: UpstreamCall) -> httpx.Response:
        """Send the request; the answer's body is left unread (stream it or read it)."""
        attempts = 2 if call.retry_idempotent else 1
        started = time.perf_counter()
        for attempt in range(attempts):
            try:
                response = await self.client.send(self._request(call), stream=True)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                # A pooled keep-alive connection the server had already closed fails
                # before any byte is received: safe to retry once for GET.
                if attempt + 1 < attempts:
                    log.debug("retrying %s after %s", call.method, type(exc).__name__)
                    continue
                raise self._failed(call, exc) from None
            except httpx.HTTPError as exc:
                raise self._failed(call, exc) from None
            metrics.UPSTREAM_DURATION.labels(
                call.route, call.method, str(response.status_code)
            ).observe(time.perf_counter() - started)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _failed(call: UpstreamCall, exc: httpx.HTTPError) -> ProxyError:
        metrics.UPSTREAM_ERRORS.labels(call.route, error_kind(exc)).inc()
        return map_error(exc)

    async def fetch(self, call: UpstreamCall, max_bytes: int) -> tuple[httpx.Response, bytes]:
        """Send and read the whole (raw, undecoded) body within the total timeout."""
        try:
            with anyio.fail_after(self.total_timeout):
                response = await self.open(call)
                try:
                    body = await read_raw(response, max_bytes)
                finally:
                    await response.aclose()
        except TimeoutError:
            metrics.UPSTREAM_ERRORS.labels(call.route, "timeout").inc()
            raise ProxyError(504, "upstream timed out") from None
        except httpx.HTTPError as exc:  # while reading the body
            raise self._failed(call, exc) from None
        return response, body


async def read_raw(response: httpx.Response, max_bytes: int) -> bytes:
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
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return "timeout"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect"
    return "protocol"


def map_error(exc: httpx.HTTPError) -> ProxyError:
    kind = error_kind(exc)
    if kind == "timeout":
        return ProxyError(504, f"upstream timed out ({type(exc).__name__})")
    if kind == "connect":
        return ProxyError(502, "upstream unreachable: could not connect to Bifrost")
    return ProxyError(502, f"upstream protocol error: {type(exc).__name__}")

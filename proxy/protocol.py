"""uvicorn's httptools protocol, hardened at the client edge.

uvicorn leaves four holes that this subclass closes, each answered the way nginx does:

- no timeout for a request whose headers never complete (slowloris): a timer answers
  408 in Bifrost's envelope and closes (``client_header_timeout_seconds``);
- no limit on the size of a request's headers (httptools buffers a header of any
  size): past ``max_header_bytes`` the answer is 431 and the connection is closed
  before the rest is read;
- the trailer fields of a chunked body are appended to the request's headers after
  the app has started: they are dropped, so only headers that came before the body
  exist;
- a request with ``Upgrade`` that is not upgraded (WebSockets are off) leaves the
  parser stopped: it is answered as plain HTTP and the connection then closed,
  without logging its headers.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

log = logging.getLogger("proxy.protocol")


def _raw_answer(status: int, reason: bytes, message: str) -> bytes:
    body = error_body(status, message)
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


_TIMEOUT_ANSWER = _raw_answer(
    408, b"Request Timeout", "request headers not received in time (client_header_timeout_seconds)"
)
_TOO_LARGE_ANSWER = _raw_answer(
    431, b"Request Header Fields Too Large", "request headers are larger than max_header_bytes"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Module level so uvicorn's spawned workers can import it; each worker's app
    factory sets the class limits from its settings.

    One timer per connection checks when the current request's headers began; each
    request only stamps a time (a timer per request cost ~3% of a cache hit).
    """

    header_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    _header_timer: asyncio.TimerHandle | None = None
    _headers_since: float | None = None
    _in_head = True  # the parser is inside a request line or header section
    _head_bytes = 0  # bytes received while in the current head (an upper bound)
    _refused = False  # answered and closing: nothing more is parsed

    def _schedule(self, delay: float) -> None:
        self._header_timer = self.loop.call_later(delay, self._check_headers)

    def _check_headers(self) -> None:
        since = self._headers_since
        if since is None:  # between requests: uvicorn's keep-alive timeout applies
            self._schedule(self.header_timeout)
            return
        waited = self.loop.time() - since
        if waited < self.header_timeout:
            self._schedule(self.header_timeout - waited)
        else:
            self._refuse(_TIMEOUT_ANSWER)

    def _refuse(self, answer: bytes) -> None:
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_since = self.loop.time()
        self._schedule(self.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after parsing it all: every byte counted was a head byte.
        if self._in_head and self._head_bytes > self.max_header_bytes:
            self._refuse(_TOO_LARGE_ANSWER)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._headers_since = None
        self._in_head = False
        # The bytes counted are an upper bound of the head's size: only when they pass
        # the limit (the whole head, maybe with body bytes, in one read) measure it.
        if self._head_bytes > self.max_header_bytes:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.max_header_bytes:
                self._refuse(_TOO_LARGE_ANSWER)
                return
        super().on_headers_complete()
        # httptools reports a chunked body's trailer fields through on_header, which
        # appends to this list, the request's scope["headers"]: give it a list nobody
        # reads, so trailers never become headers (on_message_begin makes a new one).
        self.headers = []

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        if not self._refused:
            super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's own warning would fire on every such request; the parser stops at
        # an upgrade, so the connection must not be kept for another request.
        log.debug("Upgrade not supported: answered as plain HTTP, then closed")
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

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

It also opens the hit lane: a keep-alive GET that repeats a memoised HIT is answered
here, as soon as its headers are parsed, in one write (``HitMemo.answer_wire``). An
ASGI cycle, its task and two checked ``send`` calls cost more than the rest of a HIT.
The lane only takes a request nothing else is waiting before (no response in progress,
no pipelined request queued, the client reading), so answers keep their order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body
from .hotpath import HitMemo, path_key

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
    _laned = False  # the current request was answered by the hit lane
    lane: HitMemo | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The proxy's app offers its memo; another app (or one wrapped by uvicorn for
        # trace logging) gets no lane, and every request goes through ASGI.
        self.lane = getattr(self.app, "hit_lane", None)

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
        if self.lane is not None and self._answer_from_lane():
            self._laned = True
        else:
            # A HIT the lane answered earlier in this same read armed the keep-alive
            # timer (uvicorn cancels it only when data arrives): this request must not
            # run under it.
            self._unset_keepalive_if_required()
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
        if self._laned:  # answered already, and no cycle was made for it
            self._laned = False
        elif not self._refused:
            super().on_message_complete()

    def _answer_from_lane(self) -> bool:
        """Answer a memoised HIT now, or say no (and nothing was written)."""
        url, parser, cycle = self.url, self.parser, self.cycle
        if (
            parser.get_method() != b"GET"
            or (cycle is not None and not cycle.response_complete)  # answers keep order
            or self.pipeline
            or self.flow.write_paused  # a client not reading waits in ASGI's drain
            or not url.startswith(b"/")  # absolute-form, or asterisk
            or b"?" in url  # a query string (or a fragment: llhttp keeps it in the URL)
            or b"#" in url
            or self.root_path
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()  # Connection: close is ASGI's to honour
            or parser.should_upgrade()
            or self.expect_100_continue
        ):
            return False
        assert self.lane is not None
        key = path_key(url, self.headers, self.lane.identity)
        if key is None:
            return False
        defaults = self.server_state.default_headers
        try:
            if not self.lane.answer_wire(key, self.headers, defaults, self.transport.write):
                return False
        except Exception:  # never lose a request to the lane: ASGI answers it instead
            log.exception("hit lane failed; answering through the app")
            return False
        self.on_response_complete()  # as after any answer: keep-alive timer, counters
        return True

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

"""uvicorn's httptools protocol with a request-header timeout.

uvicorn has no timeout for a request whose headers never complete, so a client
trickling headers (slowloris) could hold a connection forever. This subclass starts
a timer when a connection opens and when each new request begins, cancels it when the
headers are complete, and otherwise answers 408 in Bifrost's envelope and closes, as
nginx's ``client_header_timeout`` does.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

_BODY = error_body(408, "request headers not received in time (client_header_timeout_seconds)")
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_BODY)
) + _BODY


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Module level so uvicorn's spawned workers can import it; each worker's app
    factory sets ``header_timeout`` from its settings.

    One timer per connection checks when the current request's headers began; each
    request only stamps a time (a timer per request cost ~3% of a cache hit).
    """

    header_timeout: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None
    _headers_since: float | None = None

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
        elif not self.transport.is_closing():
            self.transport.write(_TIMEOUT_ANSWER)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_since = self.loop.time()
        self._schedule(self.header_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._headers_since = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

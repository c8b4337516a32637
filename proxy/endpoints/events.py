"""GET …/videos/{video_id}/events: a Server-Sent Events stream of the job's status.

Served by the proxy (Bifrost has no such route): one event per status or progress
change, each ``data:`` the job JSON exactly as a retrieve returns it, an ``id:`` per
event (stable, so a reconnect with ``Last-Event-ID`` does not get that snapshot again),
``: keepalive`` comments, and the end of the stream after the terminal event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..exchange import Reply, reply_response
from ..policy import TERMINAL, request_directives
from ..services import Services
from ..watch import Watch, event_id, job_state
from .common import addressed, client_gone
from .retrieve import Lookup

log = logging.getLogger("proxy.events")
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front: do not buffer the stream
]


async def status_stream(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    lookup = Lookup(services, ex, route, video, request.scope)
    reply = await lookup.current(request_directives(ex.header(b"cache-control")))
    if job_state(reply) is None:  # an error (or odd answer): an ordinary answer, no stream
        return reply_response(ex, reply, services.clock())
    last = ex.header(b"last-event-id")
    return EventStream(services, lookup, reply, last.decode("latin-1") if last else None)


def event(body: bytes, state: tuple[str, Any]) -> bytes:
    lines = b"".join(b"data: " + line + b"\n" for line in body.splitlines() or [b""])
    return b"id: " + event_id(state).encode() + b"\n" + lines + b"\n"


class SlowReader(Exception):
    """The client took no data for ``sse_send_timeout_seconds``."""


class EventStream(Response):
    def __init__(
        self, services: Services, lookup: Lookup, first: Reply, last_event_id: str | None
    ) -> None:
        self.services, self.lookup, self.first = services, lookup, first
        self.last_event_id = last_event_id
        self.send_timeout = services.settings.sse_send_timeout_seconds
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        gone = asyncio.ensure_future(client_gone(receive))
        try:
            await self._events(send, gone)
            await self._send(send, b"", more=False)
        except SlowReader:
            # Returning without the final message makes the server close the
            # connection (as nginx's send_timeout does): its slot is free again.
            log.info("closed an SSE stream whose reader took no data in time")
        finally:
            gone.cancel()

    async def _events(self, send: Send, gone: asyncio.Future[None]) -> None:
        services, lookup = self.services, self.lookup
        settings = services.settings
        first = self.first
        state = job_state(first)
        if state is None:
            return
        watchers = services.watchers
        full = state[0] not in TERMINAL and watchers.full(lookup.key)
        if full:
            # No waiting slot (past max_waiters, or this tenant's share): the snapshot,
            # then the end of the stream; EventSource reconnects after ``retry``.
            retry_ms = int(max(1.0, 2 * watchers.interval) * 1000)
            await self._send(send, b"retry: %d\n" % retry_ms + event(first.body, state))
            return
        if event_id(state) != self.last_event_id:
            await self._send(send, event(first.body, state))
        if state[0] in TERMINAL:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.max_wait_seconds * 60
        provider = lookup.video.provider
        with watchers.join(lookup.key, provider, lookup.poll, first, "sse") as watch:
            while (remaining := deadline - loop.time()) > 0:
                if not await self._wait(
                    watch, state, min(settings.sse_keepalive_seconds, remaining), gone
                ):
                    return  # the client left
                if watch.closing:
                    return  # shutting down: the client reconnects (Last-Event-ID) elsewhere
                if watch.state is not None and watch.state != state:
                    state = watch.state
                    await self._send(send, event(watch.snapshot.body, state))
                    if state[0] in TERMINAL:
                        return
                else:
                    await self._send(send, b": keepalive\n\n")

    @staticmethod
    async def _wait(
        watch: Watch, state: tuple[str, Any], timeout: float, gone: asyncio.Future[None]
    ) -> bool:
        """Wait for a change or the timeout; False when the client has gone."""
        changed = asyncio.ensure_future(watch.next_change(state, timeout))
        await asyncio.wait({changed, gone}, return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        return not gone.done()

    async def _send(self, send: Send, data: bytes, *, more: bool = True) -> None:
        """One write; the server blocks it while the client's buffers are full."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await send({"type": "http.response.body", "body": data, "more_body": more})
        except TimeoutError:
            raise SlowReader from None

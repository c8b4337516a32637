"""The pass-through, and the relay under content downloads: bodies streamed both ways."""

from __future__ import annotations

import logging
import time

import anyio
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import headers as hdr
from ..errors import ProxyError
from ..exchange import Exchange
from ..forwarder import forward_headers, video_id
from ..routes import Kind
from ..upstream import StreamBroken, Upstream, UpstreamCall, UpstreamResponse
from .common import client_gone, context

log = logging.getLogger("proxy")
_STRIP_FROM_STREAM = frozenset({b"x-request-id"})


async def passthrough(request: Request) -> Response:
    """Any other route under ``/v1/`` and ``/openai/``, streamed both ways. Under
    ``…/videos`` an id after ``videos`` is validated (400) and ownership-checked (404)
    first, and sent in its canonical form."""
    services, ex, route = context(request)
    path = ex.raw_path
    if route.kind is Kind.VIDEO_PASSTHROUGH:
        path = route.prefix + route.rest
        if route.id_segment is not None:
            video = video_id(services, route.id_segment)
            ex.provider = video.provider
            principal = services.owners.principal(ex.headers)
            await services.owners.check(video, principal, ex.route)  # foreign: the 404
            path = f"{route.prefix}/{video.upstream_segment}{route.rest}"
    bodies = services.bodies
    bodies.check_declared(ex)
    declared = ex.header(b"content-length")
    body_done = anyio.Event()
    failure: list[ProxyError] = []
    headers = forward_headers(ex)
    content = None
    if declared not in (None, b"0") or ex.header(b"transfer-encoding") is not None:
        content = bodies.stream(request.receive, body_done, failure)
        if declared is not None and declared.isdigit():
            # The server enforced this length on the body we relay (else the stream
            # fails and the upstream request is aborted); without one it goes chunked.
            headers.append((b"content-length", str(int(declared)).encode()))
    else:
        body_done.set()
    call = UpstreamCall(
        ex.method, path, request.scope.get("query_string", b""), headers, content,
        streaming=True, route=ex.route,
    )  # fmt: skip
    return UpstreamStream(services.upstream, ex, call, body_done, failure)


class UpstreamStream(Response):
    """The upstream answer relayed chunk by chunk, as raw (undecoded) bytes.

    A watcher cancels the copy as soon as the client disconnects, so the upstream
    read stops and its connection is closed instead of draining the download.
    """

    def __init__(
        self,
        upstream: Upstream,
        ex: Exchange,
        call: UpstreamCall,
        body_done: anyio.Event | None,
        failure: list[ProxyError] | None = None,
        *,
        response: UpstreamResponse | None = None,
        cache: str = "",
    ) -> None:
        """``response``: an answer already opened (relay it); ``cache``: the
        X-Cache-Status to add (content downloads relayed unstored say BYPASS)."""
        self.upstream, self.ex, self.call = upstream, ex, call
        self.body_done = body_done
        self.failure = failure if failure is not None else []
        self.response = response
        self.cache = cache
        if cache:
            ex.cache = cache
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        response = self.response
        if response is None:
            try:
                response = await self.upstream.open(self.call)
            except ProxyError:
                if self.failure:  # the request body failed: that is the cause to report
                    raise self.failure[0] from None
                raise
            self.ex.upstream_ms = round((time.perf_counter() - started) * 1000, 3)
        headers = [
            (k.lower(), v)
            for k, v in hdr.strip_hop_by_hop(response.raw_headers, also=_STRIP_FROM_STREAM)
        ]
        if self.cache:
            headers.append((b"x-cache-status", self.cache.encode()))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": headers})  # fmt: skip
                try:
                    async for chunk in response.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        # Neither call has to yield (buffered upstream bytes; a server
                        # that drops sends to a gone client): yield after each chunk, so
                        # the watcher sees a hang-up before the download is drained (and
                        # the loop reads and writes both sockets while we copy: measured
                        # ~15% faster downloads than yielding once per MiB).
                        await anyio.lowlevel.checkpoint()
                except StreamBroken as exc:
                    # Headers are gone already: all we can do is cut the answer short
                    # (returning without the final message makes the server close the
                    # connection, so the client sees a truncated body, not a clean end).
                    log.warning("upstream stream broke: %s", exc.kind)
                else:
                    await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            await response.aclose()

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        if self.body_done is not None:
            await self.body_done.wait()
        await client_gone(receive)
        scope.cancel()

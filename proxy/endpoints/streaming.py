"""GET …/videos/{video_id}/content and the pass-through: bodies streamed both ways."""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import headers as hdr
from ..decoy import ForeignJob
from ..errors import ProxyError
from ..exchange import Exchange, reply_response
from ..forwarder import decoy_call, forward_headers, video_id
from ..routes import Kind
from ..upstream import StreamBroken, Upstream, UpstreamCall
from .common import addressed, client_gone, context

log = logging.getLogger("proxy")
# Forwarded as given, as Bifrost does: OpenAI's names are video, thumbnail and
# spritesheet, Bifrost's own constant is sprite_sheet; new ones need no proxy change.
VARIANT_RE = re.compile(r"[a-z0-9_]{1,32}")
_STRIP_FROM_STREAM = frozenset({b"x-request-id"})


async def content(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    query = request.scope.get("query_string", b"")
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == "variant" and not VARIANT_RE.fullmatch(value):
            raise ProxyError(
                400,
                "variant must be 1 to 32 of a-z, 0-9 and _ (e.g. video, thumbnail, "
                "spritesheet, sprite_sheet)",
                param="variant",
            )
    try:
        await services.owners.check(video, services.owners.principal(ex.headers), ex.route)
    except ForeignJob as foreign:  # as the upstream answers for no job (read whole)
        reply = await decoy_call(
            services, ex, foreign, lambda v: f"{route.prefix}/{v.upstream_segment}/content",
            query=query, retry=True,
        )  # fmt: skip
        return reply_response(ex, reply, services.clock())
    call = UpstreamCall(
        "GET", f"{route.prefix}/{video.upstream_segment}/content", query, forward_headers(ex),
        retry_idempotent=True, streaming=True, route=ex.route,
    )  # fmt: skip
    return UpstreamStream(services.upstream, ex, call, None)


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
    ) -> None:
        self.upstream, self.ex, self.call = upstream, ex, call
        self.body_done = body_done
        self.failure = failure if failure is not None else []
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
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

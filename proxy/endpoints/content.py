"""GET/HEAD …/videos/{video_id}/content: a video from the content store when it holds it,
else filled from the upstream while it is sent, else relayed as Bifrost answers.

Ownership is checked first (another tenant gets the 404 an unknown job gets, never a
stored byte); then the store (HIT), a running fill of the same object (MISS, shared), a
new fill for a job seen completed (MISS), or a plain relay (BYPASS). Stored answers
honour ``Range``, ``If-Range`` and ``If-None-Match`` (see ``content.ranges``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import metrics
from ..content.fills import Fill, FillBroken
from ..content.objects import ObjectMeta, Stored, StoreError
from ..content.ranges import Plan, plan
from ..content.store import storable_length
from ..decoy import ForeignJob
from ..errors import ProxyError, error_body
from ..exchange import Exchange, reply_response
from ..forwarder import decoy_call, forward_headers
from ..ids import InvalidVideoId, parse_decoded
from ..services import Services
from ..upstream import StreamBroken, Upstream, UpstreamCall
from .common import addressed, client_gone
from .streaming import UpstreamStream

log = logging.getLogger("proxy.content")
# Forwarded as given, as Bifrost does: OpenAI's names are video, thumbnail and
# spritesheet, Bifrost's own constant is sprite_sheet; new ones need no proxy change.
VARIANT_RE = re.compile(r"[a-z0-9_]{1,32}")
# Never sent on a fill: it fetches the whole object, plainly, for every later reader.
_NOT_FOR_A_FILL = frozenset(
    {b"range", b"if-range", b"if-none-match", b"if-modified-since", b"if-match",
     b"if-unmodified-since", b"accept-encoding"}
)  # fmt: skip


def variant_of(query: bytes) -> tuple[str, bool]:
    """The variant asked for (``video`` by default), and whether the query holds only
    that (anything else is relayed unstored, as for retrieve); 400 for a bad variant."""
    variant, other = "video", False
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key != "variant":
            other = True
            continue
        if not VARIANT_RE.fullmatch(value):
            raise ProxyError(
                400,
                "variant must be 1 to 32 of a-z, 0-9 and _ (e.g. video, thumbnail, "
                "spritesheet, sprite_sheet)",
                param="variant",
            )
        variant = value
    return variant, other


async def content(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    query = request.scope.get("query_string", b"")
    variant, other_params = variant_of(query)
    principal = services.owners.principal(ex.headers)
    try:
        await services.owners.check(video, principal, ex.route)
    except ForeignJob as foreign:  # as the upstream answers for no job (read whole)
        reply = await decoy_call(
            services, ex, foreign, lambda v: f"{route.prefix}/{v.upstream_segment}/content",
            query=query, retry=True,
        )  # fmt: skip
        if services.content.enabled:  # exactly as an unknown job's relayed answer
            ex.cache = "BYPASS"
            metrics.CONTENT_REQUESTS.labels("bypass").inc()
        return reply_response(ex, reply, services.clock())
    path = f"{route.prefix}/{video.upstream_segment}/content"
    relay = UpstreamCall(
        ex.method, path, query, forward_headers(ex), retry_idempotent=True, streaming=True,
        route=ex.route,
    )  # fmt: skip
    store = services.content
    if not store.enabled:
        return UpstreamStream(services.upstream, ex, relay, None)  # as before the store
    if other_params:
        return bypass(services.upstream, ex, relay)
    key = store.key(principal, video.canonical, variant)
    try:
        stored = await store.lookup(key)
    except StoreError as exc:
        log.warning("content store: %s; relayed instead", exc)
        return bypass(services.upstream, ex, relay, "error")
    if stored is not None:
        return ContentAnswer(ex, stored.meta, stored, "HIT")
    fill = await store.running_fill(key)
    if fill is None and ex.method == "GET" and store.can_fill():
        done = await store.completion(video.canonical)
        if done is not None:  # only a job seen completed is stored
            call = whole_object(ex, path, query, ex.route)
            fill, response = await store.begin_fill(
                key, services.upstream, call, (video.canonical, variant, done)
            )
            if fill is None:  # not a storable answer (404 not ready, no length, …)
                return UpstreamStream(
                    services.upstream, ex, call, None, response=response, cache="BYPASS"
                )
    if fill is not None:
        refetch = whole_object(ex, path, query, ex.route)  # if the store fails mid-fill
        return ContentAnswer(ex, fill.meta, fill, "MISS", (services.upstream, refetch))
    return bypass(services.upstream, ex, relay)


def whole_object(ex: Exchange, path: str, query: bytes, route: str) -> UpstreamCall:
    """The upstream GET of a whole video, as a fill (or its refetch) sends it."""
    return UpstreamCall(
        "GET", path, query, forward_headers(ex, drop=_NOT_FOR_A_FILL), retry_idempotent=True,
        streaming=True, route=route,
    )  # fmt: skip


def bypass(
    upstream: Upstream, ex: Exchange, call: UpstreamCall, result: str = "bypass"
) -> Response:
    metrics.CONTENT_REQUESTS.labels(result).inc()
    return UpstreamStream(upstream, ex, call, None, cache="BYPASS")


class ContentAnswer(Response):
    """A stored object (or a running fill of one) as RFC 9110 answers a GET or HEAD."""

    def __init__(
        self,
        ex: Exchange,
        meta: ObjectMeta,
        source: Stored | Fill,
        cache: str,
        refetch: tuple[Upstream, UpstreamCall] | None = None,
    ) -> None:
        self.ex, self.meta, self.source, self.cache = ex, meta, source, cache
        self.refetch = refetch
        self.background = None
        ex.cache = cache

    def _plan(self) -> Plan:
        ex, meta = self.ex, self.meta
        last_modified = meta.header("last-modified")
        return plan(
            meta.size,
            meta.etag.encode("latin-1"),
            last_modified.encode("latin-1") if last_modified else None,
            range_header=ex.header(b"range") if ex.method == "GET" else None,
            if_range=ex.header(b"if-range"),
            if_none_match=ex.header(b"if-none-match"),
        )

    def _answer_headers(self, answer: Plan) -> list[tuple[bytes, bytes]]:
        meta = self.meta
        headers = [(b"etag", meta.etag.encode("latin-1"))]
        for name, value in meta.headers:
            if answer.status == 304 and name not in ("cache-control", "last-modified"):
                continue
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        headers.append((b"accept-ranges", b"bytes"))
        if answer.status == 206:
            span = b"bytes %d-%d/%d" % (answer.start, answer.end - 1, meta.size)
            headers.append((b"content-range", span))
        if answer.status in (200, 206):
            headers.append((b"content-length", b"%d" % answer.length))
        headers.append((b"x-cache-status", self.cache.encode()))
        return headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = self._plan()
            if answer.status == 416:
                metrics.CONTENT_REQUESTS.labels("range").inc()
                body = error_body(
                    416, f"range not satisfiable: this video has {self.meta.size} bytes",
                    param="range",
                )  # fmt: skip
                await send({"type": "http.response.start", "status": 416, "headers": [
                    (b"content-range", b"bytes */%d" % self.meta.size),
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"x-cache-status", self.cache.encode()),
                ]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            result = "range" if answer.status == 206 else self.cache.lower()
            metrics.CONTENT_REQUESTS.labels("hit" if answer.status == 304 else result).inc()
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": self._answer_headers(answer)})  # fmt: skip
            if answer.status == 304 or self.ex.method == "HEAD" or not answer.length:
                await send({"type": "http.response.body", "body": b""})
                return
            await self._send_body(answer, receive, send)
        finally:
            if not isinstance(self.source, Fill):
                self.source.close()

    async def _send_body(self, answer: Plan, receive: Receive, send: Send) -> None:
        source = "store" if self.cache == "HIT" else "upstream"
        counter = metrics.CONTENT_BYTES.labels(source)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_hang_up, receive, tg.cancel_scope)
            try:
                async for chunk in self._chunks(answer.start, answer.end):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    counter.inc(len(chunk))
                    await anyio.lowlevel.checkpoint()  # let the hang-up watch run
            except (StoreError, FillBroken, StreamBroken, ProxyError) as exc:
                # The headers are gone: cut the answer short (no final message, so the
                # server closes the connection and the client sees a truncated body).
                metrics.CONTENT_STORE_ERRORS.labels("read").inc()
                log.warning("content answer cut short: %s", type(exc).__name__)
            else:
                await send({"type": "http.response.body", "body": b""})
            tg.cancel_scope.cancel()

    async def _chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.source.chunks(start, end):
                yield chunk
        except FillBroken as broken:
            if not broken.refetch or self.refetch is None:
                raise
            # The store failed mid-fill, the upstream did not: fetch the rest ourselves.
            async for chunk in refetched(*self.refetch, self.meta.size, broken.position, end):
                yield chunk


async def refetched(
    upstream: Upstream, call: UpstreamCall, size: int, start: int, end: int
) -> AsyncIterator[bytes]:
    """Bytes ``[start, end)`` from a new upstream transfer of the whole object (Bifrost
    ignores Range): the leading bytes are read and dropped."""
    response = await upstream.open(call)
    try:
        if storable_length(response.status_code, response.raw_headers) != size:
            raise StreamBroken("protocol")  # not the same object any more
        position = 0
        async for chunk in response.aiter_raw():
            low, high = max(start - position, 0), min(end - position, len(chunk))
            position += len(chunk)
            if low < high:
                yield chunk[low:high]
            if position >= end:
                return
    finally:
        await response.aclose()


async def _cancel_on_hang_up(receive: Receive, scope: anyio.CancelScope) -> None:
    await client_gone(receive)
    scope.cancel()


async def prefetch(services: Services, ex: Exchange, job_id: str) -> None:
    """Store a completed job's ``video`` in the background, with the credentials of
    the request that saw it complete (so under that tenant's key)."""
    store = services.content
    try:
        video = parse_decoded(job_id, services.rules)
    except InvalidVideoId:
        return
    principal = services.owners.principal(ex.headers)
    key = store.key(principal, video.canonical, "video")
    try:
        if not store.can_fill() or key in store.fills or await store.lookup(key) is not None:
            return
    except StoreError:
        return
    done = await store.completion(video.canonical)
    if done is None:
        return
    prefix = "/openai/v1/videos" if ex.route.startswith("/openai/") else "/v1/videos"
    call = whole_object(
        ex, f"{prefix}/{video.upstream_segment}/content", b"", prefix + "/{video_id}/content"
    )
    try:
        fill, response = await store.begin_fill(
            key, services.upstream, call, (video.canonical, "video", done)
        )
    except ProxyError as exc:
        log.warning("content prefetch failed: %s", exc.message)
        return
    if fill is None:
        await response.aclose()
    else:
        metrics.CONTENT_PREFETCHES.inc()

"""GET …/videos/{video_id}: the cached, coalesced retrieve (both families)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from .. import metrics
from ..cache import Entry
from ..exchange import Exchange, Reply, reply_response
from ..forwarder import call_json
from ..ids import VideoId
from ..policy import (
    EntryKind,
    RequestDirectives,
    cache_key,
    decide,
    request_directives,
    servable,
    tenant_fingerprint,
)
from ..rewrite import dumps
from ..services import Services
from .common import addressed


async def retrieve(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    directives = request_directives(ex.header(b"cache-control"))
    key = cache_key(route.family, video.canonical, tenant_fingerprint(ex.headers, services.secret))
    query = request.scope.get("query_string", b"")
    if query:  # Bifrost's retrieve takes none; if one is sent, it gets its own entry
        key += "?" + query.decode("latin-1")
    fetch = Fetch(services, ex, f"{route.prefix}/{video.upstream_segment}", key, video, query)
    if directives.bypass:
        ex.cache = "BYPASS"
        return reply_response(ex, await fetch.from_upstream(directives), services.clock())
    entry = services.cache.get_nowait(key)  # in-process stores answer without awaiting
    if entry is not None and servable(entry.deadline, services.clock()):
        reply = Reply(entry.status, entry.headers, entry.body, entry)
        services.hot.remember(request.scope, key, entry, route.template, ex.provider)
    else:
        # Shared stores are read inside the single flight: a burst of identical
        # polls costs one lookup (and at most one upstream call) per process.
        reply, joined = await services.flights.run(key, lambda: fetch.shared(directives))
        if reply.entry is None:
            ex.cache = "COALESCED" if joined else "MISS"
    if reply.entry is not None:
        ex.cache = "HIT" if reply.entry.kind is EntryKind.TERMINAL else "COALESCED"
    return reply_response(ex, reply, services.clock())


class Fetch:
    """Getting one retrieve answer when the in-process cache has none."""

    def __init__(
        self, services: Services, ex: Exchange, path: str, key: str, video: VideoId, query: bytes
    ) -> None:
        self.services, self.ex, self.path, self.key = services, ex, path, key
        self.video, self.query = video, query

    def _fresh(self, entry: Entry | None) -> Reply | None:
        if entry is not None and servable(entry.deadline, self.services.clock()):
            return Reply(entry.status, entry.headers, entry.body, entry)
        return None

    async def shared(self, directives: RequestDirectives) -> Reply:
        """The shared store's entry if fresh; else one upstream call across replicas."""
        cache = self.services.cache
        reply = self._fresh(await cache.get(self.key))
        if reply is not None:
            return reply
        wait = min(self.services.settings.upstream_timeout_seconds, 10.0)
        if not await cache.lock(self.key, wait):
            # Another replica is fetching this very answer: wait for its entry.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                await anyio.sleep(0.01)
                reply = self._fresh(await cache.get(self.key))
                if reply is not None:
                    return reply
        try:
            return await self.from_upstream(directives)
        finally:
            await cache.unlock(self.key)

    async def from_upstream(self, directives: RequestDirectives) -> Reply:
        """Call upstream for a retrieve and store what the rules allow."""
        services = self.services
        reply, doc = await call_json(
            services, self.ex, self.path, self.video.provider, query=self.query, retry=True
        )
        now = services.clock()
        decision = decide(
            reply.status, doc, len(reply.body), now, services.limits, directives, reply.headers
        )
        if decision is not None and doc is not None:
            body = hit_body(doc) if decision.kind is EntryKind.TERMINAL else reply.body
            entry = Entry(
                self.video.canonical, decision.kind, reply.status, reply.headers, body, now,
                decision.deadline,
            )  # fmt: skip
            await services.cache.put(self.key, entry)
            entries, size = services.cache.stats()
            metrics.CACHE_ENTRIES.set(entries)
            metrics.CACHE_BYTES.set(size)
        return reply


def hit_body(doc: dict[str, Any]) -> bytes:
    """The answer as a HIT sends it: Bifrost's own cache-debug shape added."""
    extra = doc.get("extra_fields")
    extra = dict(extra) if isinstance(extra, dict) else {}
    extra["cache_debug"] = {
        "cache_hit": True,
        "hit_type": "direct",
        "cache_id": secrets.token_hex(12),
    }
    return dumps({**doc, "extra_fields": extra})

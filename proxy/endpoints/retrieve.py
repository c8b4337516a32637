"""GET …/videos/{video_id}: the cached, coalesced retrieve (both families), and its
long-poll form (``Prefer: wait=N``, RFC 7240)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from .. import metrics
from ..cache import Entry
from ..decoy import ForeignJob
from ..errors import ProxyError, UnknownJob
from ..exchange import Exchange, Reply, reply_response
from ..forwarder import call_json, decoy_call
from ..ids import VideoId
from ..policy import (
    TERMINAL,
    EntryKind,
    RequestDirectives,
    cache_key,
    decide,
    request_directives,
    servable,
)
from ..rewrite import compact, dumps
from ..routes import Route
from ..services import Services
from ..watch import job_state
from .common import addressed, client_gone


async def retrieve(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    lookup = Lookup(services, ex, route, video, request.scope)
    wait = prefer_wait(ex.headers)
    applied = None if wait is None else min(wait, services.settings.max_wait_seconds)
    reply = await lookup.current(request_directives(ex.header(b"cache-control")))
    if applied is None:
        return reply_response(ex, reply, services.clock())
    return await long_poll(services, lookup, reply, applied, request.receive)


def prefer_wait(headers: list[tuple[bytes, bytes]]) -> float | None:
    """``wait=N`` from the Prefer headers (RFC 7240); None when absent or malformed."""
    for name, value in headers:
        if name != b"prefer":
            continue
        for preference in value.split(b","):
            token, _, rest = preference.split(b";")[0].strip().partition(b"=")
            if token.strip().lower() == b"wait":
                seconds = rest.strip().strip(b'"')
                return float(seconds) if seconds.isdigit() and len(seconds) < 10 else None
    return None


async def long_poll(
    services: Services, lookup: Lookup, reply: Reply, applied: float, receive: Receive
) -> Response:
    """The same job JSON a retrieve returns: at once if the job is terminal, else once
    it is terminal, or after ``applied`` seconds with the latest snapshot. A status or
    progress change alone does not end the wait (the SSE stream is for progress).

    ``Preference-Applied`` (RFC 7240) only when the wait was honoured: the job was
    waited on, or was already terminal. Errors, and answers given at once for want of
    a waiting slot, do not claim it."""
    ex = lookup.ex
    state = job_state(reply)
    watchers = services.watchers
    honoured = state is not None and (state[0] in TERMINAL or applied == 0)
    if (
        state is not None
        and state[0] not in TERMINAL
        and applied > 0
        and not watchers.full(lookup.key)
    ):
        honoured = True
        started = time.perf_counter()
        with watchers.join(
            lookup.key, lookup.video.provider, lookup.poll, reply, "long_poll"
        ) as watch:
            ended = asyncio.ensure_future(watch.until_terminal(applied))
            gone = asyncio.ensure_future(client_gone(receive))
            await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            gone.cancel()
            reply = watch.snapshot
        metrics.WAIT_SECONDS.observe(time.perf_counter() - started)
    response = reply_response(ex, reply, services.clock())
    if honoured:
        response.raw_headers.append((b"preference-applied", b"wait=%d" % applied))
    return response


class Lookup:
    """One tenant's retrieve of one job: the cache key, and how to get the answer."""

    def __init__(
        self, services: Services, ex: Exchange, route: Route, video: VideoId, scope: Scope
    ) -> None:
        self.services, self.ex, self.video, self.scope = services, ex, video, scope
        query = self.query = scope.get("query_string", b"")
        self.prefix = route.prefix
        self.path = f"{route.prefix}/{video.upstream_segment}"
        self.route_template = route.template
        self.principal = services.owners.principal(ex.headers)
        key = cache_key(route.family, video.canonical, self.principal)
        if query:
            # Bifrost's retrieve takes none: forwarded as sent, joined only with the same
            # query, never stored (or one client could mint an entry per query string).
            key += "?" + query.decode("latin-1")
        self.key = key

    async def current(self, directives: RequestDirectives) -> Reply:
        """The answer to a plain retrieve now, ``ex.cache`` set to how it was found."""
        services, ex = self.services, self.ex
        if directives.bypass:
            ex.cache = "BYPASS"
            return await self.from_upstream(directives)
        entry = services.cache.get_nowait(self.key)  # in-process stores answer at once
        if entry is not None and servable(entry.deadline, services.clock()):
            reply = Reply(entry.status, entry.headers, entry.body, entry)
            services.hot.remember(self.scope, self.key, entry, self.route_template, ex.provider)
        elif (watched := services.watchers.fresh(self.key)) is not None:
            reply = watched  # waiting clients re-polling after a wake-up: no cache trip
            ex.cache = "COALESCED"
        else:
            # Shared stores are read inside the single flight: a burst of identical
            # polls costs one lookup (and at most one upstream call) per process.
            try:
                reply, joined = await services.flights.run(
                    self.key, lambda: self.shared(directives)
                )
            except UnknownJob:
                ex.cache = "MISS"  # as an upstream "not found" is: indistinguishable
                raise
            if reply.entry is None:
                ex.cache = "COALESCED" if joined else "MISS"
        if reply.stale:
            ex.cache = "STALE"
        elif reply.entry is not None:
            ex.cache = "HIT" if reply.entry.kind is EntryKind.TERMINAL else "COALESCED"
        return reply

    async def poll(self) -> Reply:
        """A watcher's poll: through the same single flight and cache as plain polls."""
        reply, _ = await self.services.flights.run(
            self.key, lambda: self.shared(RequestDirectives())
        )
        return reply

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
            # Another replica is fetching this very answer: wait for its entry, or for
            # its lock to go without one (a failure, an answer not stored): then fetch.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                await anyio.sleep(0.01)
                reply = self._fresh(await cache.get(self.key))
                if reply is not None:
                    return reply
                if await cache.lock(self.key, wait):
                    break
        try:
            return await self.from_upstream(directives)
        finally:
            await cache.unlock(self.key)

    async def from_upstream(self, directives: RequestDirectives) -> Reply:
        """Call upstream and store what the rules allow; a failure may be answered with
        the job's last running snapshot (stale-if-error, RFC 5861)."""
        services = self.services
        # Only here: a cached answer under this tenant's key was checked when stored.
        try:
            await services.owners.check(self.video, self.principal, self.route_template)
        except ForeignJob as foreign:  # never cached, never a stale snapshot
            return await decoy_call(
                services, self.ex, foreign, lambda v: f"{self.prefix}/{v.upstream_segment}",
                query=self.query, retry=True,
            )  # fmt: skip
        try:
            reply, doc = await call_json(
                services, self.ex, self.path, self.video.provider, query=self.query, retry=True
            )
        except ProxyError as exc:
            if exc.status not in (502, 504):
                raise
            stale = await services.stale.get(self.video.canonical, self.key, services.clock())
            if stale is None:
                raise
            return stale
        if reply.status == 429 or reply.status >= 500:
            stale = await services.stale.get(self.video.canonical, self.key, services.clock())
            return stale or reply
        now = services.clock()
        decision = decide(
            reply.status, doc, len(reply.body), now, services.limits, directives, reply.headers
        )
        if decision is not None and doc is not None and not self.query and not reply.drift:
            body = compact(hit_body(doc) if decision.kind is EntryKind.TERMINAL else reply.body)
            entry = Entry(
                self.video.canonical, decision.kind, reply.status, reply.headers, body, now,
                decision.deadline,
            )  # fmt: skip
            await services.cache.put(self.key, entry)
            services.stale.remember(self.video.canonical, self.key, entry)
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

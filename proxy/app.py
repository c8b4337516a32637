"""The ASGI application: classify, validate, forward, rewrite, answer.

A plain ASGI callable in front (no routing framework on the hot path): the route
is decided from the raw path by ``routes.classify``, bad input is rejected before
any upstream call, JSON answers are read whole (to rewrite ids and feed the cache),
and content downloads and pass-through are streamed both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import signal
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import anyio.lowlevel
import httpx
from starlette.requests import Request

from . import headers as hdr
from . import logs, metrics
from .cache import CacheStore, Entry, create_store
from .coalesce import SingleFlight
from .errors import ProxyError
from .ids import IdRules, InvalidVideoId, VideoId, normalize_provider, parse_decoded, parse_segment
from .multipart import to_json_body
from .policy import (
    CREDENTIAL_HEADERS,
    EXTRA_HEADER_PREFIX,
    CacheLimits,
    EntryKind,
    RequestDirectives,
    cache_key,
    decide,
    request_directives,
    servable,
    tenant_fingerprint,
)
from .rewrite import canonicalize_ids, dumps, parse_json_object
from .routes import Kind, Route, classify
from .settings import Settings
from .transitions import StatusTracker
from .upstream import StreamBroken, Upstream, UpstreamCall, UpstreamResponse

log = logging.getLogger("proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = (b"content-type", b"application/json")
_STRIP_FROM_REQUEST = frozenset(
    {b"host", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
)
_STRIP_FROM_ANSWER = frozenset({b"content-length", b"x-request-id"})
_STRIP_FROM_STREAM = frozenset({b"x-request-id"})
# Upstream JSON answers are read whole; anything larger is refused with 502.
MAX_JSON_ANSWER_BYTES = 256 * 1024 * 1024
VARIANTS = ("video", "thumbnail", "spritesheet")
# Video routes whose upstream request never carries a body (see ``refuse_body``).
_BODILESS = frozenset({Kind.RETRIEVE, Kind.LIST, Kind.CONTENT, Kind.DELETE})
HIT_ROUTES = ("/v1/videos/{video_id}", "/openai/v1/videos/{video_id}")
HOT_MAX = 16384  # memoised hit answers (references to live cache entries)
FLUSH_SECONDS = 1.0


# A GET carrying any of these takes the slow path: Cache-Control may ask to bypass the
# cache, and a body (refused on GET) must get the same answer whether cached or not.
_SLOW_PATH_HEADERS = frozenset({b"cache-control", b"content-length", b"transfer-encoding"})


def hot_key(scope: Scope) -> tuple[bytes, bytes] | None:
    """(raw path, credential headers) of a plain GET, or None if it must take the slow
    path (a query string, or a header in ``_SLOW_PATH_HEADERS``)."""
    if scope["query_string"]:
        return None
    creds = b""
    for name, value in scope["headers"]:
        if name in CREDENTIAL_HEADERS or name.startswith(EXTRA_HEADER_PREFIX):
            creds += name + b"\x00" + value + b"\x01"
        elif name in _SLOW_PATH_HEADERS:
            return None
    return scope.get("raw_path") or scope["path"].encode(), creds


@dataclass(frozen=True, slots=True)
class HotHit:
    """A memoised HIT: the cache key and entry it stands for, headers ready to send.

    The entry is held weakly: once the store lets go of it (delete, purge, eviction,
    expiry, refresh) the memo must not keep it, or its memory, alive.
    """

    key: str
    entry_ref: weakref.ref[Entry]
    route: int  # index into HIT_ROUTES
    provider: str
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Exchange:
    """Everything known about one request while it is handled (and for the log)."""

    scope: Scope
    receive: Receive
    send: Send
    method: str
    raw_path: str
    request_id: str
    # The headers as they were before any body was read: a server that appends a
    # chunked body's trailer fields to the scope's list must not add headers later.
    headers: list[tuple[bytes, bytes]]
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    route: str = "other"
    cache: str = ""
    provider: str = ""
    upstream_ms: float | None = None
    response_started: bool = False

    def header(self, name: bytes) -> bytes | None:
        return hdr.get(self.headers, name)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.response_started = True
        headers.append((b"x-request-id", self.request_id.encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers.append((b"content-length", str(len(body)).encode()))
        await self.start(status, headers)
        await self.send({"type": "http.response.body", "body": body})

    async def error(self, exc: ProxyError) -> None:
        headers = [JSON_TYPE] + [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        if self.cache:
            headers.append((b"x-cache-status", self.cache.encode()))
        await self.answer(exc.status, headers, exc.body())


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to relay: from the upstream just now, or from a cache entry."""

    status: int
    headers: list[tuple[bytes, bytes]]  # without Content-Length and X-Request-ID
    body: bytes
    entry: Entry | None = None  # set when served from the cache


def refuse_body(ex: Exchange) -> None:
    """400 for a body on a bodiless video route (GET retrieve/list/content, DELETE).

    Refused rather than dropped: the client meant something by it, and a silently
    dropped body is a silently changed request. Nothing goes upstream either way.
    """
    length = ex.header(b"content-length")
    if (length is not None and length.strip() != b"0") or ex.header(b"transfer-encoding"):
        raise ProxyError(400, f"a {ex.method} request on this video route must not have a body")


_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


def _request_id(raw: bytes | None) -> str:
    """The client's X-Request-ID if sane, else a new one (unique per process start:
    a random prefix and a counter, cheaper than 16 fresh random bytes per request)."""
    if raw and len(raw) <= 128 and all(0x21 <= b < 0x7F for b in raw):
        return raw.decode()
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


class ProxyApp:
    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rules: IdRules = settings.id_rules()
        self.clock = clock
        self._transport = transport
        self.upstream: Upstream | None = None
        self.cache: CacheStore | None = None
        self.flights: SingleFlight[Reply] = SingleFlight()
        self.secret = settings.effective_cache_key_secret()
        self.limits = CacheLimits(
            terminal_ttl_seconds=settings.terminal_ttl_seconds,
            max_ttl_seconds=settings.max_ttl_seconds,
            poll_coalesce_seconds=settings.poll_coalesce_seconds,
            max_entry_bytes=settings.cache_max_entry_bytes,
        )
        self.tracker = StatusTracker()
        self.hot: dict[tuple[bytes, bytes], HotHit] = {}
        self.hits = metrics.HitRecorder(HIT_ROUTES)
        self.hit_log: list[tuple[float, HotHit, float, str]] = []
        # Access lines are buffered and written in batches (every FLUSH_SECONDS and at
        # shutdown): the logging machinery per request cost ~10% of a pass-through.
        self.access_rows: list[dict[str, Any]] = []
        self.log_access = log.isEnabledFor(logging.INFO)
        self.draining = False
        self._ready_cache: tuple[float, bool] = (0.0, False)

    # -- lifecycle ----------------------------------------------------------------------
    @asynccontextmanager
    async def running(self) -> AsyncIterator[ProxyApp]:
        """Open the upstream pool (and later the cache); close them on exit."""
        self.upstream = Upstream(self.settings, self._transport)
        self.cache = create_store(
            self.settings, self.clock, self.on_cache_error, metrics.CACHE_EVICTIONS.inc
        )
        swap = getattr(self.cache, "swap_status", None)
        self.tracker = StatusTracker(swap=swap)
        flusher = asyncio.ensure_future(self._flush_loop())
        try:
            yield self
        finally:
            flusher.cancel()
            self.flush()
            await self.upstream.aclose()
            await self.cache.aclose()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        """Move fast-path hit counts into the metrics and write their access lines."""
        self.hits.flush()
        lines, self.hit_log = self.hit_log, []
        rows, self.access_rows = self.access_rows, []
        logs.write_access_batch(
            rows
            + [
                {
                    "created": created,
                    "method": "GET",
                    "route": HIT_ROUTES[hot.route],
                    "status": 200,
                    "duration_ms": round(seconds * 1000, 3),
                    "cache": "HIT",
                    "upstream_ms": None,
                    "request_id": request_id,
                    "provider": hot.provider,
                }
                for created, hot, seconds, request_id in lines
            ]
        )

    def on_cache_error(self, op: str) -> None:
        """A cache backend operation failed."""
        metrics.CACHE_BACKEND_ERRORS.labels(self.settings.cache_backend, op).inc()

    def _watch_sigterm(self) -> None:
        """Flag draining on SIGTERM, then let the server's own handler run."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self.draining = True
            if callable(previous):
                previous(signum, frame)

        # Only the main thread may set handlers (a test server in a thread may not).
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, on_term)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            async with self.running():
                self._watch_sigterm()
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
                self.draining = True
        except Exception as exc:  # startup failure must stop the server, loudly
            log.error("startup failed: %s", exc)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    # -- ASGI entry ------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":  # not part of the API: refuse the handshake (403)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and self.hot:
            hot = self.hot.get(hot_key(scope))  # type: ignore[arg-type]
            if hot is not None and await self.send_hot(hot, scope, send):
                return
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        headers = list(scope["headers"])
        ex = Exchange(
            scope, receive, send, scope["method"], path,
            _request_id(hdr.get(headers, b"x-request-id")), headers,
        )  # fmt: skip
        metrics.INFLIGHT.inc()
        try:
            route = classify(ex.method, path)
            ex.route = route.template
            await self.dispatch(route, ex)
        except ProxyError as exc:
            if not ex.response_started:
                await ex.error(exc)
        except Exception:
            log.exception("unexpected error handling %s %s", ex.method, ex.route)
            if not ex.response_started:
                await ex.error(ProxyError(502, "proxy error while handling the request"))
        finally:
            metrics.INFLIGHT.dec()
            self.observe(ex)

    async def send_hot(self, hot: HotHit, scope: Scope, send: Send) -> bool:
        """The cache-hit fast path: no routing, no parsing, precomputed bytes."""
        started = time.perf_counter()
        assert self.cache is not None
        entry = hot.entry_ref()
        now = self.clock()
        if entry is None or self.cache.get_nowait(hot.key) is not entry or not now < entry.deadline:
            self.hot.pop(hot_key(scope), None)  # type: ignore[arg-type]
            return False  # deleted, evicted, refreshed or expired: the slow path decides
        request_id = hdr.get(scope["headers"], b"x-request-id")
        rid = _request_id(request_id)
        headers = [
            *hot.headers,
            (b"age", str(int(now - entry.stored_at)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        await send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await send({"type": "http.response.body", "body": entry.body})
        seconds = time.perf_counter() - started
        self.hits.record(hot.route, seconds)
        if self.log_access:
            self.hit_log.append((time.time(), hot, seconds, rid))
        return True

    def remember_hit(self, ex: Exchange, route: Route, key: str, entry: Entry) -> None:
        """Memoise a HIT so the next identical request takes the fast path."""
        if (
            self.cache is None
            or self.cache.name != "memory"
            or entry.kind is not EntryKind.TERMINAL
        ):
            return  # shared stores can change under us: always ask them
        hk = hot_key(ex.scope)
        if hk is None:
            return
        if len(self.hot) >= HOT_MAX:
            self.hot.clear()
        headers = [
            *entry.headers,
            (b"x-cache-status", b"HIT"),
            (b"content-length", str(len(entry.body)).encode()),
        ]
        hot = self.hot

        def forget(ref: weakref.ref[Entry], hk: tuple[bytes, bytes] = hk) -> None:
            slot = hot.get(hk)
            if slot is not None and slot.entry_ref is ref:
                del hot[hk]

        ref = weakref.ref(entry, forget)
        hot[hk] = HotHit(key, ref, HIT_ROUTES.index(route.template), ex.provider, headers)

    def observe(self, ex: Exchange) -> None:
        """Metrics and the access log line for a finished request."""
        elapsed = time.perf_counter() - ex.started
        metrics.REQUESTS.labels(ex.route, ex.method, str(ex.status)).inc()
        cache = ex.cache.lower()
        metrics.REQUEST_DURATION.labels(ex.route, ex.method, cache or "none").observe(elapsed)
        if cache:
            metrics.CACHE_REQUESTS.labels(cache).inc()
            if cache in ("hit", "coalesced"):
                metrics.CALLS_SAVED.inc()
        if self.log_access:
            self.access_rows.append(
                {
                    "created": time.time(), "method": ex.method, "route": ex.route,
                    "status": ex.status, "duration_ms": round(elapsed * 1000, 3),
                    "cache": ex.cache, "upstream_ms": ex.upstream_ms,
                    "request_id": ex.request_id, "provider": ex.provider,
                }
            )  # fmt: skip

    async def dispatch(self, route: Route, ex: Exchange) -> None:
        kind = route.kind
        if kind in _BODILESS:
            refuse_body(ex)
        if kind is Kind.HEALTHZ:
            await ex.answer(200, [JSON_TYPE], b'{"status":"ok"}')
        elif kind is Kind.READYZ:
            await self.readyz(ex)
        elif kind is Kind.METRICS:
            if self.settings.metrics_port:
                raise ProxyError(404, "metrics are served on metrics_port only")
            self.flush()
            body, content_type = metrics.exposition((ex.header(b"accept") or b"").decode("latin-1"))
            await ex.answer(200, [(b"content-type", content_type.encode())], body)
        elif kind in (Kind.ADMIN_PURGE_ALL, Kind.ADMIN_PURGE_ONE):
            await self.admin_purge(route, ex)
        elif kind is Kind.PASSTHROUGH:
            await self.passthrough(ex)
        elif kind is Kind.CONTENT:
            await self.content(route, ex)
        elif kind is Kind.LIST:
            await self.list_videos(route, ex)
        elif kind in (Kind.CREATE, Kind.REMIX):
            await self.create_or_remix(route, ex)
        elif kind is Kind.RETRIEVE:
            await self.retrieve(route, ex)
        else:  # DELETE
            video = self.video_id(route)
            ex.provider = video.provider
            reply, _ = await self.call_json(
                ex, f"{route.prefix}/{video.upstream_segment}", video.provider
            )
            if 200 <= reply.status < 300:
                # Before answering, so the client's next poll cannot hit a stale entry.
                assert self.cache is not None
                await self.cache.delete_video(video.canonical)
            await self.send_reply(ex, reply)

    # -- helpers ---------------------------------------------------------------------------
    def video_id(self, route: Route) -> VideoId:
        try:
            return parse_segment(route.id_segment or "", self.rules)
        except InvalidVideoId as exc:
            raise ProxyError(400, str(exc), param="video_id") from None

    def forward_headers(
        self, ex: Exchange, *, drop: frozenset[bytes] = frozenset()
    ) -> list[tuple[bytes, bytes]]:
        scope = ex.scope
        headers = hdr.forwardable(ex.headers, also=_STRIP_FROM_REQUEST | drop)
        client = scope.get("client")
        prior = ex.header(b"x-forwarded-for")
        if client:
            ip = client[0].encode()
            headers.append((b"x-forwarded-for", prior + b", " + ip if prior else ip))
        elif prior:
            headers.append((b"x-forwarded-for", prior))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        host = ex.header(b"host")
        if host:
            headers.append((b"x-forwarded-host", host))
        headers.append((b"x-request-id", ex.request_id.encode()))
        return headers

    @staticmethod
    def answer_headers(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
        return [
            (k.lower(), v)
            for k, v in hdr.strip_hop_by_hop(response.raw_headers, also=_STRIP_FROM_ANSWER)
        ]

    async def receive_body(self, ex: Exchange) -> Message:
        """The next request-body message, within client_body_timeout_seconds."""
        try:
            async with asyncio.timeout(self.settings.client_body_timeout_seconds):
                return await ex.receive()
        except TimeoutError:
            raise ProxyError(
                408, "request body not received in time (client_body_timeout_seconds)"
            ) from None

    async def read_body(self, ex: Exchange) -> bytes:
        """The whole request body, refusing with 413 past ``max_request_bytes``."""
        limit = self.settings.max_request_bytes
        declared = ex.header(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise self.too_large()
            except ValueError:
                raise ProxyError(400, "invalid Content-Length header") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive_body(ex)
            if message["type"] == "http.disconnect":
                raise ProxyError(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def too_large(self) -> ProxyError:
        return ProxyError(
            413,
            f"request body is larger than max_request_bytes ({self.settings.max_request_bytes})",
        )

    async def stream_body(
        self, ex: Exchange, done: anyio.Event, failure: list[ProxyError]
    ) -> AsyncIterator[bytes]:
        """The request body as it arrives, for pass-through.

        A failure is also put in ``failure``: the HTTP client wraps exceptions raised
        by a body iterator in its own, and the client must still hear the real cause.
        """
        limit = self.settings.max_request_bytes
        size = 0
        try:
            while True:
                try:
                    message = await self.receive_body(ex)
                except ProxyError as exc:
                    failure.append(exc)
                    raise
                if message["type"] == "http.disconnect":
                    failure.append(ProxyError(400, "client disconnected mid-body"))
                    raise failure[-1]
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    failure.append(self.too_large())
                    raise failure[-1]
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            done.set()

    # -- JSON routes -----------------------------------------------------------------------
    async def call_json(
        self,
        ex: Exchange,
        path: str,
        provider: str | None,
        *,
        query: bytes | None = None,
        body: bytes | None = None,
        retry: bool = False,
        drop: frozenset[bytes] = frozenset(),
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[Reply, dict[str, Any] | None]:
        """One upstream JSON call; the answer with canonical ids, and its parsed body.

        The query string goes upstream as the client sent it unless ``query`` replaces
        it (list, whose parameters are validated and normalised).
        """
        assert self.upstream is not None
        if query is None:
            query = ex.scope.get("query_string", b"")
        # No Accept-Encoding: JSON answers come back plain, ready to parse and cache.
        headers = self.forward_headers(ex, drop=drop | {b"accept-encoding"})
        headers.extend(extra or ())
        call = UpstreamCall(
            ex.method, path, query, headers, body, retry_idempotent=retry, route=ex.route
        )
        started = time.perf_counter()
        response, raw = await self.upstream.fetch(call, MAX_JSON_ANSWER_BYTES)
        ex.upstream_ms = round((time.perf_counter() - started) * 1000, 3)
        out, doc = self.fix_answer(response, raw, provider)
        if doc is not None and 200 <= response.status_code < 300:
            await self.track_statuses(doc)
        return Reply(response.status_code, self.answer_headers(response), out), doc

    async def track_statuses(self, doc: dict[str, Any]) -> None:
        """Feed every job status an answer reveals (one job, or a list) to the tracker."""
        data = doc.get("data")
        items = data if isinstance(data, list) else [doc]
        try:
            for item in items:
                if not isinstance(item, dict):
                    continue
                video_id, status = item.get("id"), item.get("status")
                if isinstance(video_id, str) and isinstance(status, str):  # odd JSON: skip
                    await self.tracker.observe(video_id, video_id.rpartition(":")[2], item)
        except Exception:  # metrics must never fail a request
            log.exception("status tracking failed")

    async def send_reply(self, ex: Exchange, reply: Reply) -> None:
        headers = list(reply.headers)
        if ex.cache:
            headers.append((b"x-cache-status", ex.cache.encode()))
        if reply.entry is not None:
            age = max(0, int(self.clock() - reply.entry.stored_at))
            headers.append((b"age", str(age).encode()))
        await ex.answer(reply.status, headers, reply.body)

    def fix_answer(
        self, response: UpstreamResponse, raw: bytes, provider: str | None
    ) -> tuple[bytes, dict[str, Any] | None]:
        """Canonical ids in a JSON answer; the raw bytes when nothing changes."""
        if (response.header("content-encoding") or "identity") != "identity":
            return raw, None  # the upstream ignored our identity request: leave it alone
        if "json" not in (response.header("content-type") or "json"):
            return raw, None
        doc = parse_json_object(raw)
        if doc is not None and not isinstance(doc.get("status", ""), str):
            return raw, None  # odd JSON (a list or object status): relayed verbatim, uncached
        if doc is None or not canonicalize_ids(doc, provider, self.rules):
            return raw, doc
        return dumps(doc), doc

    # -- retrieve and the cache --------------------------------------------------------------
    async def retrieve(self, route: Route, ex: Exchange) -> None:
        assert self.cache is not None
        video = self.video_id(route)
        ex.provider = video.provider
        directives = request_directives(ex.header(b"cache-control"))
        key = cache_key(route.family, video.canonical, tenant_fingerprint(ex.headers, self.secret))
        query = ex.scope.get("query_string", b"")
        if query:  # Bifrost's retrieve takes none; if one is sent, it gets its own entry
            key += "?" + query.decode("latin-1")
        path = f"{route.prefix}/{video.upstream_segment}"
        if directives.bypass:
            ex.cache = "BYPASS"
            reply = await self.fetch_retrieve(ex, path, key, video, directives)
            await self.send_reply(ex, reply)
            return
        entry = self.cache.get_nowait(key)  # in-process stores answer without awaiting
        if entry is not None and servable(entry.deadline, self.clock()):
            reply = Reply(entry.status, entry.headers, entry.body, entry)
            self.remember_hit(ex, route, key, entry)
        else:
            # Shared stores are read inside the single flight: a burst of identical
            # polls costs one lookup (and at most one upstream call) per process.
            reply, joined = await self.flights.run(
                key, lambda: self.lookup_or_fetch(ex, path, key, video, directives)
            )
            if reply.entry is None:
                ex.cache = "COALESCED" if joined else "MISS"
        if reply.entry is not None:
            ex.cache = "HIT" if reply.entry.kind is EntryKind.TERMINAL else "COALESCED"
        await self.send_reply(ex, reply)

    async def lookup_or_fetch(
        self, ex: Exchange, path: str, key: str, video: VideoId, directives: RequestDirectives
    ) -> Reply:
        """The shared store's entry if fresh; else one upstream call across replicas."""
        assert self.cache is not None
        entry = await self.cache.get(key)
        if entry is not None and servable(entry.deadline, self.clock()):
            return Reply(entry.status, entry.headers, entry.body, entry)
        wait = min(self.settings.upstream_timeout_seconds, 10.0)
        if not await self.cache.lock(key, wait):
            # Another replica is fetching this very answer: wait for its entry.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                await anyio.sleep(0.01)
                entry = await self.cache.get(key)
                if entry is not None and servable(entry.deadline, self.clock()):
                    return Reply(entry.status, entry.headers, entry.body, entry)
        try:
            return await self.fetch_retrieve(ex, path, key, video, directives)
        finally:
            await self.cache.unlock(key)

    async def fetch_retrieve(
        self,
        ex: Exchange,
        path: str,
        key: str,
        video: VideoId,
        directives: RequestDirectives,
    ) -> Reply:
        """Call upstream for a retrieve and store what the rules allow."""
        assert self.cache is not None
        reply, doc = await self.call_json(ex, path, video.provider, retry=True)
        now = self.clock()
        decision = decide(
            reply.status, doc, len(reply.body), now, self.limits, directives, reply.headers
        )
        if decision is not None and doc is not None:
            body = self.hit_body(doc) if decision.kind is EntryKind.TERMINAL else reply.body
            entry = Entry(
                video.canonical, decision.kind, reply.status, reply.headers, body, now,
                decision.deadline,
            )  # fmt: skip
            await self.cache.put(key, entry)
            entries, size = self.cache.stats()
            metrics.CACHE_ENTRIES.set(entries)
            metrics.CACHE_BYTES.set(size)
        return reply

    @staticmethod
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

    async def admin_purge(self, route: Route, ex: Exchange) -> None:
        token = self.settings.admin_token
        if not token:
            raise ProxyError(404, "no such route on this proxy")
        if ex.method != "DELETE":
            raise ProxyError(405, "only DELETE is allowed on the admin cache routes")
        given = ex.header(b"authorization") or b""
        expected = b"Bearer " + token.encode()
        if not hmac.compare_digest(given, expected):
            raise ProxyError(401, "admin token required: Authorization: Bearer <admin_token>")
        assert self.cache is not None
        if route.kind is Kind.ADMIN_PURGE_ONE:
            video = self.video_id(route)
            purged = await self.cache.delete_video(video.canonical)
        else:
            purged = await self.cache.clear()
        await ex.answer(200, [JSON_TYPE], dumps({"purged": purged}))

    async def create_or_remix(self, route: Route, ex: Exchange) -> None:
        ctype = (ex.header(b"content-type") or b"").split(b";")[0].strip().lower()
        multipart = ctype == b"multipart/form-data"
        if multipart and route.family == "native" and route.kind is Kind.CREATE:
            # Bifrost's native create parses JSON only; the OpenAI SDK sends multipart.
            request = Request(ex.scope, self.limited_receive(ex))
            body = await to_json_body(request)
            replace = frozenset({b"content-type", b"content-length"})
            extra = [JSON_TYPE]
            multipart = False
        else:
            body = await self.read_body(ex)
            replace, extra = frozenset(), []
        provider: str | None = None
        doc: dict[str, Any] | None = None
        # Bifrost parses every non-multipart create/remix body as JSON, whatever its
        # Content-Type says: so does the proxy, to reject bad bodies before the call.
        if not multipart:
            doc = parse_json_object(body)
            if doc is None:
                raise ProxyError(400, "request body must be a valid JSON object")
        if route.kind is Kind.REMIX:
            video = self.video_id(route)
            provider = video.provider
            path = f"{route.prefix}/{video.upstream_segment}/remix"
        else:
            path = route.prefix
            model = doc.get("model") if doc is not None else None
            if isinstance(model, str) and "/" in model:
                try:
                    provider = normalize_provider(model.partition("/")[0], self.rules)
                except InvalidVideoId as exc:
                    raise ProxyError(400, f"model: {exc}", param="model") from None
        ex.provider = provider or ""
        reply, _ = await self.call_json(ex, path, provider, body=body, drop=replace, extra=extra)
        await self.send_reply(ex, reply)

    def limited_receive(self, ex: Exchange) -> Receive:
        """ex.receive, refusing with 413 once the body passes max_request_bytes."""
        limit = self.settings.max_request_bytes
        declared = ex.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self.too_large()
        seen = 0

        async def receive() -> Message:
            nonlocal seen
            message = await self.receive_body(ex)
            seen += len(message.get("body", b""))
            if seen > limit:
                raise self.too_large()
            return message

        return receive

    async def list_videos(self, route: Route, ex: Exchange) -> None:
        pairs = parse_qsl(
            ex.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        seen: dict[str, str] = {}
        out: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in seen:
                raise ProxyError(400, f"query parameter {key!r} given more than once", param=key)
            seen[key] = value
            out.append((key, self.check_list_param(key, value)))
        provider = seen.get("provider")
        if route.family == "native" and provider is None:
            fill = ex.header(b"x-bf-video-list-provider")
            provider = fill.decode("latin-1") if fill else self.settings.list_default_provider
            if provider:
                provider = self.check_list_param("provider", provider)
                out.append(("provider", provider))
        elif route.family == "openai":
            header = ex.header(b"x-bf-video-list-provider")
            provider = self.check_list_param(
                "provider", header.decode("latin-1") if header else "openai"
            )
        elif provider is not None:
            provider = self.check_list_param("provider", provider)
        ex.provider = provider or ""
        reply, _ = await self.call_json(
            ex, route.prefix, provider or None, query=urlencode(out).encode(), retry=True
        )
        await self.send_reply(ex, reply)

    def check_list_param(self, key: str, value: str) -> str:
        """Validate one list query value; return it in the form sent upstream."""
        if len(value) > self.settings.max_id_length * 2:
            raise ProxyError(400, f"query parameter {key!r} is too long", param=key)
        if key == "limit":
            if not value.isdigit() or not 1 <= int(value) <= 100:
                raise ProxyError(400, "limit must be an integer from 1 to 100", param="limit")
            return str(int(value))
        if key == "order":
            if value not in ("asc", "desc"):
                raise ProxyError(400, "order must be 'asc' or 'desc'", param="order")
        elif key == "provider":
            try:
                return normalize_provider(value, self.rules)
            except InvalidVideoId as exc:
                raise ProxyError(400, f"provider: {exc}", param="provider") from None
        elif key == "after":
            try:
                return parse_decoded(value, self.rules).canonical
            except InvalidVideoId as exc:
                raise ProxyError(400, f"after: {exc}", param="after") from None
        return value

    # -- streamed routes -------------------------------------------------------------------
    async def content(self, route: Route, ex: Exchange) -> None:
        video = self.video_id(route)
        ex.provider = video.provider
        query = ex.scope.get("query_string", b"")
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        for key, value in pairs:
            if key == "variant" and value not in VARIANTS:
                raise ProxyError(
                    400, "variant must be one of video, thumbnail, spritesheet", param="variant"
                )
        path = f"{route.prefix}/{video.upstream_segment}/content"
        call = UpstreamCall(
            "GET", path, query, self.forward_headers(ex), retry_idempotent=True, streaming=True,
            route=ex.route,
        )  # fmt: skip
        await self.stream(ex, call, None)

    async def passthrough(self, ex: Exchange) -> None:
        declared = ex.header(b"content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.settings.max_request_bytes
        ):
            raise self.too_large()
        body_done = anyio.Event()
        failure: list[ProxyError] = []
        has_body = declared not in (None, b"0") or ex.header(b"transfer-encoding") is not None
        content = self.stream_body(ex, body_done, failure) if has_body else None
        headers = self.forward_headers(ex)
        if content is None:
            body_done.set()
        elif declared is not None and declared.isdigit():
            # The server enforced this length on the body we relay (else the stream
            # fails and the upstream request is aborted); without one it goes chunked.
            headers.append((b"content-length", str(int(declared)).encode()))
        call = UpstreamCall(
            ex.method, ex.raw_path, ex.scope.get("query_string", b""),
            headers, content, streaming=True, route=ex.route,
        )  # fmt: skip
        try:
            await self.stream(ex, call, body_done)
        except ProxyError:
            if failure:
                raise failure[0] from None
            raise

    async def stream(self, ex: Exchange, call: UpstreamCall, body_done: anyio.Event | None) -> None:
        """Forward the upstream answer chunk by chunk, as raw (undecoded) bytes.

        A watcher cancels the copy as soon as the client disconnects, so the
        upstream connection is released at once instead of draining the download.
        """
        assert self.upstream is not None
        started = time.perf_counter()
        response = await self.upstream.open(call)
        ex.upstream_ms = round((time.perf_counter() - started) * 1000, 3)
        try:
            headers = [
                (k.lower(), v)
                for k, v in hdr.strip_hop_by_hop(response.raw_headers, also=_STRIP_FROM_STREAM)
            ]
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    if body_done is not None:
                        await body_done.wait()
                    while True:
                        message = await ex.receive()
                        if message["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                await ex.start(response.status_code, headers)
                try:
                    async for chunk in response.aiter_raw():
                        await ex.send(
                            {"type": "http.response.body", "body": chunk, "more_body": True}
                        )
                        # Neither call has to yield (buffered upstream bytes; a server
                        # that drops sends to a gone client): yield here, so the
                        # watcher sees a hang-up now, not once the download is drained.
                        await anyio.lowlevel.checkpoint()
                except StreamBroken as exc:
                    # Headers are gone already: all we can do is cut the answer short
                    # (returning without the final message makes the server close the
                    # connection, so the client sees a truncated body, not a clean end).
                    log.warning("upstream stream broke: %s", exc.kind)
                else:
                    await ex.send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            await response.aclose()

    async def readyz(self, ex: Exchange) -> None:
        if self.draining:
            raise ProxyError(503, "draining: the proxy is shutting down")
        now = time.monotonic()
        checked, ok = self._ready_cache
        if now - checked > 1.0:
            ok = await self._upstream_reachable()
            self._ready_cache = (now, ok)
        if not ok:
            raise ProxyError(503, "upstream unreachable")
        await ex.answer(200, [JSON_TYPE], b'{"status":"ready"}')

    async def _upstream_reachable(self) -> bool:
        url = urlsplit(self.settings.upstream_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with anyio.fail_after(1.0):
                stream = await anyio.connect_tcp(url.hostname or "localhost", port)
                await stream.aclose()
        except (OSError, TimeoutError):
            return False
        return True

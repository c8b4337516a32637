"""The cache-hit fast path: a pure ASGI middleware in front of everything else.

An identical repeat of a GET that was a HIT (same raw path, same credentials) is
answered from precomputed headers and the cached body, without routing, Request
objects or parsing. Everything else, and any doubt, falls through to the app.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from . import headers as hdr
from . import metrics
from .cache import CacheStore, Entry
from .exchange import request_id
from .policy import CREDENTIAL_HEADERS, EXTRA_HEADER_PREFIX, EntryKind

HIT_ROUTES = ("/v1/videos/{video_id}", "/openai/v1/videos/{video_id}")
HOT_MAX = 16384  # memoised hit answers (references to live cache entries)
# A GET carrying any of these takes the slow path: Cache-Control may ask to bypass the
# cache, a body (refused on GET) must get the same answer whether cached or not, and
# Prefer (long-poll) is answered with Preference-Applied.
_SLOW_PATH_HEADERS = frozenset(
    {b"cache-control", b"content-length", b"transfer-encoding", b"prefer"}
)


def hot_key(scope: Scope, identity: bytes | None = None) -> tuple[bytes, bytes] | None:
    """(raw path, identity headers) of a plain GET, or None if it must take the slow
    path (a query string, or a header in ``_SLOW_PATH_HEADERS``). The identity is the
    credentials plus ``identity`` (``ownership_header``), as the cache key's tenant."""
    if scope["query_string"]:
        return None
    creds = b""
    for name, value in scope["headers"]:
        if name in CREDENTIAL_HEADERS or name.startswith(EXTRA_HEADER_PREFIX) or name == identity:
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


class HitMemo:
    """Memoised HITs of the in-process store, their hit counts and access lines."""

    cache: CacheStore | None = None  # set once the store is open

    def __init__(self, clock: Callable[[], float], identity: bytes | None = None) -> None:
        self.clock = clock
        self.identity = identity
        self.slots: dict[tuple[bytes, bytes], HotHit] = {}
        self.hits = metrics.HitRecorder(HIT_ROUTES)
        self.lines: list[HitLine] = []

    def __len__(self) -> int:
        return len(self.slots)

    def remember(
        self, scope: Scope, key: str, entry: Entry, route_template: str, provider: str
    ) -> None:
        """Memoise a HIT so the next identical request takes the fast path."""
        if (
            self.cache is None
            or self.cache.name != "memory"
            or entry.kind is not EntryKind.TERMINAL
            or route_template not in HIT_ROUTES  # e.g. the SSE route: not a plain answer
        ):
            return  # shared stores can change under us: always ask them
        hk = hot_key(scope, self.identity)
        if hk is None:
            return
        if len(self.slots) >= HOT_MAX:
            self.slots.clear()
        headers = [
            *entry.headers,
            (b"x-cache-status", b"HIT"),
            (b"content-length", str(len(entry.body)).encode()),
        ]
        slots = self.slots

        def forget(ref: weakref.ref[Entry], hk: tuple[bytes, bytes] = hk) -> None:
            slot = slots.get(hk)
            if slot is not None and slot.entry_ref is ref:
                del slots[hk]

        ref = weakref.ref(entry, forget)
        slots[hk] = HotHit(key, ref, HIT_ROUTES.index(route_template), provider, headers)

    async def send(self, hot: HotHit, scope: Scope, send: Send, log_access: bool) -> bool:
        """Answer from the memo; False when the store no longer holds that entry."""
        started = time.perf_counter()
        entry = hot.entry_ref()
        now = self.clock()
        assert self.cache is not None
        if entry is None or self.cache.get_nowait(hot.key) is not entry or not now < entry.deadline:
            self.slots.pop(hot_key(scope, self.identity), None)  # type: ignore[arg-type]
            return False  # deleted, evicted, refreshed or expired: the slow path decides
        rid = request_id(hdr.get(scope["headers"], b"x-request-id"))
        headers = [
            *hot.headers,
            (b"age", str(int(now - entry.stored_at)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        await send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await send({"type": "http.response.body", "body": entry.body})
        seconds = time.perf_counter() - started
        self.hits.record(hot.route, seconds)
        if log_access:
            self.lines.append((time.time(), hot, seconds, rid))
        return True

    def take_lines(self) -> list[HitLine]:
        """The buffered access lines of hits, raw (their counts go to ``hits.flush``)."""
        lines, self.lines = self.lines, []
        return lines


HitLine = tuple[float, HotHit, float, str]  # (wall time, the hit, seconds, request id)


def hit_row(line: HitLine) -> dict[str, Any]:
    """A hit's access row, as the access log writes it (made while formatting)."""
    created, hot, seconds, rid = line
    return {
        "created": created, "method": "GET", "route": HIT_ROUTES[hot.route],
        "status": 200, "duration_ms": round(seconds * 1000, 3), "cache": "HIT",
        "upstream_ms": None, "request_id": rid, "provider": hot.provider,
    }  # fmt: skip


class HotPathMiddleware:
    """Pure ASGI (never BaseHTTPMiddleware): a HIT costs a dict lookup and two sends."""

    def __init__(
        self, app: ASGIApp | None, memo: HitMemo, log_access: bool, front: Any = None
    ) -> None:
        self.app = app
        self.memo = memo
        self.log_access = log_access
        self.front = front  # front.FrontDispatch: plain retrieve misses, without routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            key = hot_key(scope, self.memo.identity)
            if key is not None:
                hot = self.memo.slots.get(key)
                if hot is not None and await self.memo.send(hot, scope, send, self.log_access):
                    return
                route = self.front.route_of(scope) if self.front is not None else None
                if route is not None:
                    await self.front.retrieve(scope, receive, send, route)
                    return
        assert self.app is not None  # set when the app builds its middleware stack
        await self.app(scope, receive, send)

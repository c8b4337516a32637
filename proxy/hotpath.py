"""The cache-hit fast path: memoised HITs, answered before anything else.

An identical repeat of a GET that was a HIT (same raw path, same credentials) is
answered from precomputed headers and the cached body, without routing, Request
objects or parsing. Everything else, and any doubt, falls through to the app.

Two doors lead here. The HTTP protocol (``protocol.GuardedHttpToolsProtocol``) asks
``HitMemo.answer_wire`` as soon as a keep-alive GET's headers are parsed, and writes
the whole answer in one write, with no ASGI cycle or task at all. Whatever it declines
(``Connection: close``, HTTP/1.0, a pipelined request behind a busy one, a client not
reading) reaches ``HotPathMiddleware``, the outermost ASGI layer, which sends the same
bytes through uvicorn.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

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


Headers = list[tuple[bytes, bytes]]
HotKey = tuple[bytes, bytes]


def hot_key(scope: Scope, identity: bytes | None = None) -> HotKey | None:
    """(raw path, identity headers) of a plain GET, or None if it must take the slow
    path (a query string, or a header in ``_SLOW_PATH_HEADERS``). The identity is the
    credentials plus ``identity`` (``ownership_header``), as the cache key's tenant."""
    if scope["query_string"]:
        return None
    return path_key(scope.get("raw_path") or scope["path"].encode(), scope["headers"], identity)


def path_key(raw_path: bytes, headers: Headers, identity: bytes | None) -> HotKey | None:
    """``hot_key`` of a request without a query string, from its raw path and headers
    (lower-case names, as uvicorn gives them)."""
    creds = b""
    for name, value in headers:
        if name in CREDENTIAL_HEADERS or name.startswith(EXTRA_HEADER_PREFIX) or name == identity:
            creds += name + b"\x00" + value + b"\x01"
        elif name in _SLOW_PATH_HEADERS:
            return None
    return raw_path, creds


def wire_block(headers: Headers) -> bytes | None:
    """Header lines exactly as uvicorn's ``send`` writes them, or None where it would
    refuse one (then only the ASGI door answers, and refuses as it always has)."""
    lines = []
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            return None
        lines.append(name.lower() + b": " + value + b"\r\n")
    return b"".join(lines)


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
    headers: Headers
    head: bytes | None = None  # status line and ``headers`` as written on the wire (see wire_block)


class HitMemo:
    """Memoised HITs of the in-process store, their hit counts and access lines."""

    cache: CacheStore | None = None  # set once the store is open

    def __init__(
        self, clock: Callable[[], float], identity: bytes | None = None, log_access: bool = False
    ) -> None:
        self.clock = clock
        self.identity = identity
        self.log_access = log_access
        self.slots: dict[HotKey, HotHit] = {}
        self.wire_answers = 0  # HITs the protocol wrote itself (for tests and operators)
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

        block = wire_block(headers)
        status_line = STATUS_LINE.get(entry.status)
        head = None if block is None or status_line is None else status_line + block
        ref = weakref.ref(entry, forget)
        route = HIT_ROUTES.index(route_template)
        slots[hk] = HotHit(key, ref, route, provider, headers, head)

    def _live(self, hot: HotHit, hk: HotKey) -> tuple[Entry, float] | None:
        """The memo's entry and the time now, if the store still holds it unexpired."""
        entry = hot.entry_ref()
        now = self.clock()
        assert self.cache is not None
        if entry is None or self.cache.get_nowait(hot.key) is not entry or not now < entry.deadline:
            self.slots.pop(hk, None)
            return None  # deleted, evicted, refreshed or expired: the slow path decides
        return entry, now

    def _done(self, hot: HotHit, started: float, rid: str) -> None:
        seconds = time.perf_counter() - started
        self.hits.record(hot.route, seconds)
        if self.log_access:
            self.lines.append((time.time(), hot, seconds, rid))

    async def send(self, hot: HotHit, scope: Scope, send: Send) -> bool:
        """Answer from the memo; False when the store no longer holds that entry."""
        started = time.perf_counter()
        live = self._live(hot, hot_key(scope, self.identity))  # type: ignore[arg-type]
        if live is None:
            return False
        entry, now = live
        rid = request_id(hdr.get(scope["headers"], b"x-request-id"))
        headers = [
            *hot.headers,
            (b"age", str(int(now - entry.stored_at)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        await send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await send({"type": "http.response.body", "body": entry.body})
        self._done(hot, started, rid)
        return True

    def answer_wire(
        self, hk: HotKey, headers: Headers, defaults: Headers, write: Callable[[bytes], object]
    ) -> bool:
        """The protocol's door: write a memoised HIT as one HTTP/1.1 message (``defaults``
        are uvicorn's default headers, written first as its ``send`` does); False when
        there is none, and nothing was written."""
        hot = self.slots.get(hk)
        if hot is None or hot.head is None:
            return False
        started = time.perf_counter()
        live = self._live(hot, hk)
        if live is None:
            return False
        entry, now = live
        rid = request_id(hdr.get(headers, b"x-request-id"))
        tail = b"age: %d\r\nx-request-id: %s\r\n\r\n" % (now - entry.stored_at, rid.encode())
        if defaults:  # the status line comes first, then uvicorn's defaults, then ours
            cut = hot.head.index(b"\r\n") + 2
            lines = b"".join(name + b": " + value + b"\r\n" for name, value in defaults)
            message = b"".join((hot.head[:cut], lines, hot.head[cut:], tail, entry.body))
        else:
            message = b"".join((hot.head, tail, entry.body))
        self._done(hot, started, rid)
        self.wire_answers += 1
        write(message)  # last: if anything above raised, nothing was written
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

    def __init__(self, app: ASGIApp | None, memo: HitMemo, front: Any = None) -> None:
        self.app = app
        self.memo = memo
        self.front = front  # front.FrontDispatch: plain retrieve misses, without routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            key = hot_key(scope, self.memo.identity)
            if key is not None:
                hot = self.memo.slots.get(key)
                if hot is not None and await self.memo.send(hot, scope, send):
                    return
                route = self.front.route_of(scope) if self.front is not None else None
                if route is not None:
                    await self.front.retrieve(scope, receive, send, route)
                    return
        assert self.app is not None  # set when the app builds its middleware stack
        await self.app(scope, receive, send)

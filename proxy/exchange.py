"""One request while it is handled: what the access log and metrics will say of it, and
the answers the proxy builds (relayed bytes, or its own errors in Bifrost's envelope)."""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .cache import Entry
from .errors import ProxyError

JSON_TYPE = (b"content-type", b"application/json")
EXCHANGE = "proxy.exchange"  # the scope key under which the Exchange travels

_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


def request_id(raw: bytes | None) -> str:
    """The client's X-Request-ID if sane, else a new one (unique per process start:
    a random prefix and a counter, cheaper than 16 fresh random bytes per request)."""
    if raw and len(raw) <= 128 and all(0x21 <= b < 0x7F for b in raw):
        return raw.decode()
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


@dataclass(slots=True)
class Exchange:
    """Everything known about one request while it is handled (and for the log)."""

    method: str
    raw_path: str  # below the app's root_path, still percent-encoded
    request_id: str
    # The headers as they were before any body was read: a server that appends a
    # chunked body's trailer fields to the scope's list must not add headers later.
    headers: list[tuple[bytes, bytes]]
    client: tuple[str, int] | None = None
    scheme: str = "http"
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    route: str = "other"  # metric label: a route template, never a raw path
    cache: str = ""
    provider: str = ""
    upstream_ms: float | None = None
    response_started: bool = False
    _index: dict[bytes, bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` lower-case); indexed on first use,
        as a request asks for several."""
        index = self._index
        if index is None:
            index = self._index = {}
            for key, value in self.headers:
                index.setdefault(key.lower(), value)
        return index.get(name)


def exchange_of(request: Request) -> Exchange:
    ex: Exchange = request.scope[EXCHANGE]
    return ex


def refuse_body(ex: Exchange) -> None:
    """400 for a body on a bodiless video route (GET retrieve/list/content, DELETE).

    Refused rather than dropped: the client meant something by it, and a silently
    dropped body is a silently changed request. Nothing goes upstream either way.
    """
    length = ex.header(b"content-length")
    if (length is not None and length.strip() != b"0") or ex.header(b"transfer-encoding"):
        raise ProxyError(400, f"a {ex.method} request on this video route must not have a body")


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to relay: from the upstream just now, or from a cache entry."""

    status: int
    headers: list[tuple[bytes, bytes]]  # without Content-Length and X-Request-ID
    body: bytes
    entry: Entry | None = None  # set when served from the cache
    stale: bool = False  # a running snapshot answered because the upstream failed
    drift: bool = False  # broke the documented shape (see ``contract``): never cached


class RawResponse(Response):
    """Bytes and raw header pairs exactly as given, plus their Content-Length."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = status
        self.body = body
        self.background = None
        self.raw_headers = [*headers, (b"content-length", str(len(body)).encode())]


def reply_response(ex: Exchange, reply: Reply, now: float) -> RawResponse:
    headers = list(reply.headers)
    if ex.cache:
        headers.append((b"x-cache-status", ex.cache.encode()))
    if reply.entry is not None:
        age = max(0, int(now - reply.entry.stored_at))
        headers.append((b"age", str(age).encode()))
    return RawResponse(reply.status, headers, reply.body)


def json_response(body: bytes, status: int = 200) -> RawResponse:
    return RawResponse(status, [JSON_TYPE], body)


def error_response(exc: ProxyError, ex: Exchange | None) -> RawResponse:
    headers = [JSON_TYPE] + [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if ex is not None and ex.cache:
        headers.append((b"x-cache-status", ex.cache.encode()))
    return RawResponse(exc.status, headers, exc.body())


def access_row(ex: Exchange, elapsed: float) -> dict[str, Any]:
    return {
        "created": time.time(), "method": ex.method, "route": ex.route, "status": ex.status,
        "duration_ms": round(elapsed * 1000, 3), "cache": ex.cache,
        "upstream_ms": ex.upstream_ms, "request_id": ex.request_id, "provider": ex.provider,
    }  # fmt: skip

"""The pure ASGI middleware between the hit fast path and the router.

``ObserveMiddleware`` opens the request's Exchange, stamps X-Request-ID on every
answer, turns any unexpected exception into a 502 envelope (never a 500), and records
metrics and the access line (its pieces serve the front dispatch too, see ``front``).
``RawPathRouting`` decides the route from the raw path and hands the router a
canonical path (see its docstring for why).
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import headers as hdr
from . import metrics
from .errors import ProxyError
from .exchange import EXCHANGE, Exchange, access_row, error_response, request_id
from .routes import ROUTE, canonical_path, classify
from .services import Services

log = logging.getLogger("proxy")


def open_exchange(scope: Scope) -> Exchange:
    """The Exchange of a new request (also used by the front dispatch)."""
    headers = list(scope["headers"])
    raw = scope.get("raw_path")
    ex = Exchange(
        scope["method"], raw.decode("latin-1") if raw else scope["path"],
        request_id(hdr.get(headers, b"x-request-id")), headers, scope.get("client"),
        scope.get("scheme", "http"),
    )  # fmt: skip
    scope[EXCHANGE] = ex
    return ex


def stamped(ex: Exchange, send: Send) -> Send:
    """``send`` that records the status and adds X-Request-ID to the answer."""
    rid = (b"x-request-id", ex.request_id.encode())

    async def observed_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            ex.status, ex.response_started = message["status"], True
            message["headers"] = [*message.get("headers", ()), rid]
        await send(message)

    return observed_send


async def observed(
    services: Services, ex: Exchange, scope: Scope, receive: Receive, send: Send, app: ASGIApp
) -> None:
    """Run ``app`` for one request: any unexpected exception is a 502 envelope (never a
    500), and the request is counted and logged once it is over."""
    metrics.INFLIGHT.inc()
    try:
        await app(scope, receive, send)
    except Exception as exc:
        if not isinstance(exc, ProxyError):
            log.exception("unexpected error handling %s %s", ex.method, ex.route)
            exc = ProxyError(502, "proxy error while handling the request")
        if not ex.response_started:
            await error_response(exc, ex)(scope, receive, send)
    finally:
        metrics.INFLIGHT.dec()
        observe(services, ex)


def observe(services: Services, ex: Exchange) -> None:
    elapsed = time.perf_counter() - ex.started
    metrics.child(metrics.REQUESTS, ex.route, ex.method, str(ex.status)).inc()
    cache = ex.cache.lower()
    metrics.child(metrics.REQUEST_DURATION, ex.route, ex.method, cache or "none").observe(elapsed)
    if cache:
        metrics.child(metrics.CACHE_REQUESTS, cache).inc()
        if cache in ("hit", "coalesced"):
            metrics.CALLS_SAVED.inc()
    if services.log_access:
        services.access_rows.append(access_row(ex, elapsed))


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # not part of the API: refuse the handshake (403)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = open_exchange(scope)
        await observed(self.services, ex, scope, receive, stamped(ex, send), self.app)


class RawPathRouting:
    """Validate the raw path and give the router a canonical one.

    Starlette routes on ``scope["path"]``, which the server has already
    percent-decoded: there a Gemini id's ``%2F`` is a separator, and an odd encoding
    (``vid%65os``, ``%2F``, ``//``) could make a video route look like pass-through.
    So ``routes.classify`` decides from the *raw* path (rejecting dot-segments,
    control characters and disguised video routes with 400/404), and the router
    matches the canonical path built from that decision, in which an id is one
    still-encoded segment. The decision travels in the scope for the endpoints.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex: Exchange = scope[EXCHANGE]
        root = scope.get("root_path", "")
        if root and ex.raw_path.startswith(root):  # mounted: route below the mount point
            ex.raw_path = ex.raw_path[len(root) :]
        route = scope.get(ROUTE) or classify(ex.method, ex.raw_path)
        ex.route = route.template
        scope[ROUTE] = route
        scope["path"] = root + canonical_path(route, scope["path"][len(root) :])
        await self.app(scope, receive, send)

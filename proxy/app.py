"""The Starlette application: its routes table, middleware, lifespan and error handlers.

request ─▶ protocol.GuardedHttpToolsProtocol ─(keep-alive GET, memoised HIT)─▶ answer
             │ (the hit lane: one write, no ASGI cycle)
             ▼
           HotPathMiddleware (outermost, pure ASGI) ─(memoised HIT)─▶ answer
             │         └─(plain retrieve miss)─▶ front.FrontDispatch ─▶ answer
             │ anything else
             ▼
           Starlette's ServerErrorMiddleware
             ▼
           ObserveMiddleware (Exchange, X-Request-ID, metrics, access line, 502s)
             ▼
           RawPathRouting (routes.classify on the raw path → canonical path)
             ▼
           Router ─▶ endpoints/ (retrieve, jobs, listing, content, streaming, ops)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from .endpoints import content, events, jobs, listing, ops, retrieve, streaming
from .errors import ProxyError
from .exchange import EXCHANGE, error_response
from .front import FrontDispatch
from .hotpath import HitMemo, HotPathMiddleware
from .middleware import ObserveMiddleware, RawPathRouting
from .services import Services
from .settings import Settings, load


class AnyMethod:
    """A Request -> Response endpoint for every HTTP method, as an ASGI app.

    Starlette gives a function endpoint GET (and HEAD) unless methods are listed, and a
    list cannot say "any"; an ASGI-app endpoint with no methods matches them all.
    """

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def video_routes(prefix: str) -> list[BaseRoute]:
    """The video operations the proxy improves, of one family (``/v1/videos`` or
    ``/openai/v1/videos``); other routes under it are forwarded (pass-through)."""
    return [
        Route(prefix, jobs.create, methods=["POST"]),
        Route(prefix + "/edits", jobs.edit, methods=["POST"]),
        Route(prefix, listing.list_videos, methods=["GET"]),
        Route(prefix + "/{video_id}", retrieve.retrieve, methods=["GET"]),
        Route(prefix + "/{video_id}", jobs.delete, methods=["DELETE"]),
        Route(prefix + "/{video_id}/remix", jobs.remix, methods=["POST"]),
        Route(prefix + "/{video_id}/content", content.content, methods=["GET", "HEAD"]),
        Route(prefix + "/{video_id}/events", events.status_stream, methods=["GET"]),
    ]


ROUTES: list[BaseRoute] = [
    *video_routes("/v1/videos"),
    *video_routes("/openai/v1/videos"),
    Route("/healthz", ops.healthz, methods=["GET"]),
    Route("/readyz", ops.readyz, methods=["GET"]),
    Route("/metrics", ops.metrics_page, methods=["GET"]),
    Route("/admin/cache", AnyMethod(ops.purge)),  # every method: see ops.purge
    Route("/admin/cache/videos/{video_id}", AnyMethod(ops.purge)),
    Route("/admin/webhooks", AnyMethod(ops.webhooks)),
    Route("/admin/tenants", AnyMethod(ops.tenants)),
    Route("/admin/webhooks/events/{event_id}/redeliver", AnyMethod(ops.redeliver)),
    # Pass-through (any method, CORS preflights of video routes included).
    Route("/v1/{rest:path}", AnyMethod(streaming.passthrough)),
    Route("/openai/{rest:path}", AnyMethod(streaming.passthrough)),
]


async def proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return error_response(exc, request.scope.get(EXCHANGE))


async def router_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (the router's 404/405), in Bifrost's envelope."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code if 400 <= exc.status_code < 500 else 400
    messages = {404: "no such route on this proxy", 405: "method not allowed on this route"}
    message = messages.get(status, str(exc.detail))
    return error_response(ProxyError(status, message), request.scope.get(EXCHANGE))


class ProxyStarlette(Starlette):
    """Starlette with the hit fast path outside even its ServerErrorMiddleware: a
    memoised HIT cannot raise, and must not pay for layers it never uses. Middleware
    added later (``add_middleware``) still goes inside, as usual."""

    def __init__(self, *, hot_path: HotPathMiddleware | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot_path = hot_path

    @property
    def hit_lane(self) -> HitMemo | None:
        """The memoised HITs the HTTP protocol may answer itself (see hotpath.py)."""
        return None if self.hot_path is None else self.hot_path.memo

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.hot_path is None:
            return stack
        self.hot_path.app = stack
        return self.hot_path


def create_app(
    settings: Settings | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> ProxyStarlette:
    """The proxy as a Starlette app. Without settings, they load as the CLI loads them
    (defaults < config file < ``PROXY_*`` environment). ``transport`` (an httpx
    transport, e.g. ``MockTransport``) and ``clock`` are seams for tests."""
    services = Services(settings or load(), transport=transport, clock=clock)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with services.running():
            services.watch_sigterm()
            yield
            services.draining = True

    # Plain retrieve misses skip the router (see front.py); its table says which routes.
    front = FrontDispatch(
        services,
        (r.path for r in ROUTES if isinstance(r, Route) and r.endpoint is retrieve.retrieve),
    )
    app = ProxyStarlette(
        hot_path=HotPathMiddleware(None, services.hot, front),
        routes=ROUTES,
        middleware=[Middleware(ObserveMiddleware, services=services), Middleware(RawPathRouting)],
        exception_handlers={ProxyError: proxy_error, HTTPException: router_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False
    app.state.services = services
    services.front = front
    return app

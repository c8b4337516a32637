"""The front dispatch: plain retrieve misses answered without Starlette's layers.

A retrieve is the proxy's hottest route: every poll of every running job. A miss that
went through Starlette's exception middleware, router, Request and Response objects
paid ~14 % of its cost in those layers. Here, in front of them (called by the hit fast
path when it has no memoised answer), a plain GET whose raw path ``routes.classify``
maps to a retrieve route of the routes table is answered directly: the same Exchange,
X-Request-ID, id validation, ``Lookup`` (tenant key, single flight, ownership, built
upstream headers, canonical ids, status tracking, stale-if-error), error envelopes,
metrics and access line as the routed path, whose functions it calls. Anything else
(a query, ``Prefer``, ``Cache-Control``, a body, a mount prefix, a path the classifier
refuses) goes through the app as before, so every error stays byte-identical.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Receive, Scope, Send

from .errors import ProxyError
from .exchange import EXCHANGE, error_response, reply_response
from .forwarder import video_id
from .middleware import observed, open_exchange, stamped
from .policy import RequestDirectives
from .routes import ROUTE, Kind, Route, classify
from .services import Services

PLAIN = RequestDirectives()


class FrontDispatch:
    def __init__(self, services: Services, templates: Iterable[str]) -> None:
        self.services = services
        self.templates = frozenset(templates)  # the routes table's retrieve routes
        self.answered = 0  # requests answered here (for tests and curious operators)

    def route_of(self, scope: Scope) -> Route | None:
        """The retrieve route of a plain GET (the caller checked headers and query),
        or None: the app decides (and answers errors, as it always has)."""
        raw = scope.get("raw_path")
        if raw is None or scope.get("root_path"):
            return None
        try:
            route = classify("GET", raw.decode("latin-1"))
        except ProxyError:
            return None
        if route.kind is not Kind.RETRIEVE or route.template not in self.templates:
            scope[ROUTE] = route  # RawPathRouting need not classify it again
            return None
        return route

    async def retrieve(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        self.answered += 1
        ex = open_exchange(scope)
        ex.route = route.template
        scope[ROUTE] = route
        await observed(self.services, ex, scope, receive, stamped(ex, send), self._answer(route))

    def _answer(self, route: Route) -> _Answer:
        return _Answer(self.services, route)


class _Answer:
    """The retrieve endpoint's work, as an ASGI app for ``observed``."""

    __slots__ = ("route", "services")

    def __init__(self, services: Services, route: Route) -> None:
        self.services, self.route = services, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .endpoints.retrieve import Lookup  # endpoints build on services and front

        services, route = self.services, self.route
        ex = scope[EXCHANGE]
        try:
            assert route.id_segment is not None
            video = video_id(services, route.id_segment)
            ex.provider = video.provider
            reply = await Lookup(services, ex, route, video, scope).current(PLAIN)
            response = reply_response(ex, reply, services.clock())
        except ProxyError as exc:
            response = error_response(exc, ex)
        await response(scope, receive, send)

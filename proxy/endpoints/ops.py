"""Operations: /healthz, /readyz, /metrics and the admin cache purge."""

from __future__ import annotations

import hmac
import time
from urllib.parse import urlsplit

import anyio
from starlette.requests import Request
from starlette.responses import Response

from .. import metrics
from ..errors import ProxyError
from ..exchange import RawResponse, exchange_of, json_response
from ..forwarder import video_id
from ..rewrite import dumps
from ..services import Services
from ..settings import Settings


async def healthz(request: Request) -> Response:
    return json_response(b'{"status":"ok"}')


async def readyz(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.draining:
        raise ProxyError(503, "draining: the proxy is shutting down")
    now = time.monotonic()
    checked, ok = services.ready_cache
    if now - checked > 1.0:
        ok = await upstream_reachable(services.settings)
        services.ready_cache = (now, ok)
    if not ok:
        raise ProxyError(503, "upstream unreachable")
    return json_response(b'{"status":"ready"}')


async def upstream_reachable(settings: Settings) -> bool:
    url = urlsplit(settings.upstream_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with anyio.fail_after(1.0):
            stream = await anyio.connect_tcp(url.hostname or "localhost", port)
            await stream.aclose()
    except (OSError, TimeoutError):
        return False
    return True


async def metrics_page(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.settings.metrics_port:
        raise ProxyError(404, "metrics are served on metrics_port only")
    services.flush_metrics()
    await services.refresh_cache_stats()
    accept = request.headers.get("accept", "")
    body, content_type = metrics.exposition(accept)
    return RawResponse(200, [(b"content-type", content_type.encode())], body)


def admin(request: Request, method: str) -> Services:
    """The services, once the request passed the admin gate (404 while disabled)."""
    services: Services = request.app.state.services
    token = services.settings.admin_token
    if not token:  # a disabled admin surface is indistinguishable from a missing one
        raise ProxyError(404, "no such route on this proxy")
    if request.method != method:
        raise ProxyError(405, f"only {method} is allowed on this admin route")
    given = exchange_of(request).header(b"authorization") or b""
    if not hmac.compare_digest(given, b"Bearer " + token.encode()):
        raise ProxyError(401, "admin token required: Authorization: Bearer <admin_token>")
    return services


async def purge(request: Request) -> Response:
    """DELETE /admin/cache (all) or /admin/cache/videos/{video_id} (one video)."""
    services = admin(request, "DELETE")
    segment = request.path_params.get("video_id")
    if segment is not None:
        canonical = video_id(services, segment).canonical
        purged = await services.cache.delete_video(canonical)
        content = await services.content.forget(canonical)
    else:
        purged = await services.cache.clear()
        content = await services.content.clear()
    return json_response(dumps({"purged": purged, "content_purged": content}))


async def webhooks(request: Request) -> Response:
    """GET /admin/webhooks: followed jobs (all replicas) and this process's recent events."""
    services = admin(request, "GET")
    return json_response(dumps(await services.webhooks.report()))


async def tenants(request: Request) -> Response:
    """GET /admin/tenants: the tenants (fingerprints) with the most running jobs."""
    services = admin(request, "GET")
    return json_response(dumps({"tenants": await services.budget.top_tenants()}))


async def redeliver(request: Request) -> Response:
    """POST /admin/webhooks/events/{event_id}/redeliver: one more attempt, same id."""
    services = admin(request, "POST")
    outcome = await services.webhooks.redeliver(request.path_params["event_id"])
    if outcome is None:
        raise ProxyError(404, "no such webhook event on this replica")
    return json_response(dumps({"outcome": outcome}))

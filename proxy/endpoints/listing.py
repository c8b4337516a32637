"""GET …/videos: the list, its query validated and the native provider filled in."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ProxyError
from ..exchange import Exchange, Reply, refuse_body, reply_response
from ..forwarder import call_json
from ..ids import IdRules, InvalidVideoId, normalize_provider, parse_decoded
from ..rewrite import dumps
from ..services import Services
from .common import context


async def list_videos(request: Request) -> Response:
    services, ex, route = context(request)
    refuse_body(ex)
    pairs = parse_qsl(
        request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
    )
    check = ListQuery(services.rules, services.settings.max_id_length * 2)
    seen: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in seen:
            raise ProxyError(400, f"query parameter {key!r} given more than once", param=key)
        seen[key] = value
        out.append((key, check(key, value)))
    provider = seen.get("provider")
    header = ex.header(b"x-bf-video-list-provider")
    if route.family == "native" and provider is None:
        fill = header.decode("latin-1") if header else services.settings.list_default_provider
        provider = check("provider", fill) if fill else None
        if provider:
            out.append(("provider", provider))
    elif route.family == "openai":
        provider = check("provider", header.decode("latin-1") if header else "openai")
    elif provider is not None:
        provider = check("provider", provider)
    ex.provider = provider or ""
    reply, doc = await call_json(
        services, ex, route.prefix, provider or None, query=urlencode(out).encode(), retry=True
    )
    if doc is not None and 200 <= reply.status < 300 and isinstance(doc.get("data"), list):
        reply = await only_own_jobs(services, ex, reply, doc)
    return reply_response(ex, reply, services.clock())


async def only_own_jobs(
    services: Services, ex: Exchange, reply: Reply, doc: dict[str, Any]
) -> Reply:
    """The list without the jobs other tenants own (job ownership).

    ``first_id`` names the first job left. ``last_id`` is the pagination cursor: it
    stays the upstream's while ``has_more`` (so the next page starts where this one
    ended, even when its last job was dropped), else names the last job left.
    """
    items: list[Any] = doc["data"]
    shown = await services.owners.visible(items, services.owners.principal(ex.headers), ex.route)
    if all(shown):
        return reply
    kept = [item for item, show in zip(items, shown, strict=True) if show]
    ids = [item.get("id") for item in kept if isinstance(item, dict)]
    fixed = {**doc, "data": kept, "first_id": ids[0] if ids else None}
    if not doc.get("has_more"):
        fixed["last_id"] = ids[-1] if ids else None
    return Reply(reply.status, reply.headers, dumps(fixed))


class ListQuery:
    """Validates one list query value; returns it in the form sent upstream."""

    def __init__(self, rules: IdRules, max_length: int) -> None:
        self.rules = rules
        self.max_length = max_length

    def __call__(self, key: str, value: str) -> str:
        if len(value) > self.max_length:
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

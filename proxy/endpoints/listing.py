"""GET …/videos: the list, its query validated and the native provider filled in."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ProxyError
from ..exchange import refuse_body, reply_response
from ..forwarder import call_json
from ..ids import IdRules, InvalidVideoId, normalize_provider, parse_decoded
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
    reply, _ = await call_json(
        services, ex, route.prefix, provider or None, query=urlencode(out).encode(), retry=True
    )
    return reply_response(ex, reply, services.clock())


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

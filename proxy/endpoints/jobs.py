"""POST …/videos (create), POST …/videos/{video_id}/remix, DELETE …/videos/{video_id}."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ProxyError
from ..exchange import JSON_TYPE, reply_response
from ..forwarder import call_json
from ..ids import InvalidVideoId, normalize_provider
from ..multipart import to_json_body
from ..rewrite import parse_json_object
from .common import addressed, context


async def create(request: Request) -> Response:
    return await _create_or_remix(request, remix=False)


async def remix(request: Request) -> Response:
    return await _create_or_remix(request, remix=True)


async def _create_or_remix(request: Request, *, remix: bool) -> Response:
    services, ex, route = context(request)
    ctype = (ex.header(b"content-type") or b"").split(b";")[0].strip().lower()
    multipart = ctype == b"multipart/form-data"
    replace: frozenset[bytes] = frozenset()
    extra: list[tuple[bytes, bytes]] = []
    if multipart and route.family == "native" and not remix:
        # Bifrost's native create parses JSON only; the OpenAI SDK sends multipart.
        limited = Request(request.scope, services.bodies.limited(ex, request.receive))
        body = await to_json_body(limited)
        replace, extra, multipart = frozenset({b"content-type"}), [JSON_TYPE], False
    else:
        body = await services.bodies.read(ex, request.receive)
    doc: dict[str, Any] | None = None
    # Bifrost parses every non-multipart create/remix body as JSON, whatever its
    # Content-Type says: so does the proxy, to reject bad bodies before the call.
    if not multipart:
        doc = parse_json_object(body)
        if doc is None:
            raise ProxyError(400, "request body must be a valid JSON object")
    provider: str | None = None
    if remix:
        video = addressed(request, body_allowed=True)[3]
        provider = video.provider
        path = f"{route.prefix}/{video.upstream_segment}/remix"
    else:
        path = route.prefix
        model = doc.get("model") if doc is not None else None
        if isinstance(model, str) and "/" in model:
            try:
                provider = normalize_provider(model.partition("/")[0], services.rules)
            except InvalidVideoId as exc:
                raise ProxyError(400, f"model: {exc}", param="model") from None
    ex.provider = provider or ""
    reply, _ = await call_json(
        services, ex, path, provider, query=request.scope.get("query_string", b""),
        body=body, drop=replace, extra=extra,
    )  # fmt: skip
    return reply_response(ex, reply, services.clock())


async def delete(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    reply, _ = await call_json(
        services, ex, f"{route.prefix}/{video.upstream_segment}", video.provider,
        query=request.scope.get("query_string", b""),
    )  # fmt: skip
    if 200 <= reply.status < 300:
        # Before answering, so the client's next poll cannot hit a stale entry.
        await services.cache.delete_video(video.canonical)
        services.stale.forget(video.canonical)
    return reply_response(ex, reply, services.clock())

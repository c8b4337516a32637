"""POST …/videos (create), POST …/videos/{video_id}/remix, DELETE …/videos/{video_id}."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import edits, idempotency
from ..decoy import ForeignJob
from ..errors import NotSent, ProxyError
from ..exchange import JSON_TYPE, Exchange, Reply, reply_response, request_id
from ..follows import Followed
from ..forwarder import call_json, decoy_call
from ..ids import InvalidVideoId, normalize_provider, parse_decoded
from ..multipart import to_json_body
from ..policy import TERMINAL, cache_key
from ..rewrite import parse_json_object
from ..routes import Kind, Route
from ..services import Services
from ..watch import job_state
from ..webhooks import HEADER, Endpoint
from .common import addressed, context
from .retrieve import Lookup


async def create(request: Request) -> Response:
    return await _new_job(request, Kind.CREATE)


async def remix(request: Request) -> Response:
    return await _new_job(request, Kind.REMIX)


async def edit(request: Request) -> Response:
    return await _new_job(request, Kind.EDITS)


async def _new_job(request: Request, kind: Kind) -> Response:
    """Create, remix or edit: a request whose answer is a new job (its owner recorded,
    ``Idempotency-Key`` and ``X-Proxy-Webhook`` honoured)."""
    services, ex, route = context(request)
    # Unknown (or not this tenant's): 400, nothing sent.
    webhook = services.webhooks.endpoint(ex.header(HEADER), ex.headers)
    idempotency_key = idempotency.key_of(ex)  # malformed: 400, nothing sent
    principal = services.owners.principal(ex.headers)
    content_type = ex.header(b"content-type") or b""
    ctype = content_type.split(b";")[0].strip().lower()
    multipart = ctype == b"multipart/form-data"
    replace: frozenset[bytes] = frozenset()
    extra: list[tuple[bytes, bytes]] = []
    if multipart and route.family == "native" and kind is Kind.CREATE:
        # Bifrost's native create parses JSON only; the OpenAI SDK sends multipart.
        limited = Request(request.scope, services.bodies.limited(ex, request.receive))
        body = await to_json_body(limited)
        replace, extra, multipart = frozenset({b"content-type"}), [JSON_TYPE], False
    else:
        body = await services.bodies.read(ex, request.receive)
    doc: dict[str, Any] | None = None
    # Bifrost parses every non-multipart create/remix/edit body as JSON, whatever its
    # Content-Type says: so does the proxy, to reject bad bodies before the call.
    if not multipart:
        doc = parse_json_object(body)
        if doc is None:
            raise ProxyError(400, "request body must be a valid JSON object")
    query = request.scope.get("query_string", b"")
    provider = model_provider(services, doc.get("model") if doc is not None else None)
    if kind is Kind.REMIX:
        video = addressed(request, body_allowed=True)[3]
        try:
            await services.owners.check(video, principal, ex.route)
        except ForeignJob as foreign:  # as the upstream answers a remix of no job
            reply = await decoy_call(
                services, ex, foreign, lambda v: f"{route.prefix}/{v.upstream_segment}/remix",
                query=query, body=body,
            )  # fmt: skip
            return reply_response(ex, reply, services.clock())
        provider = video.provider
        path = f"{route.prefix}/{video.upstream_segment}/remix"
    elif kind is Kind.EDITS:
        path = f"{route.prefix}/edits"
        fields = doc if doc is not None else await edits.form_fields(body, content_type)
        source = edits.source_video(fields, services.rules)  # malformed: 400, nothing sent
        if source is not None:
            video, written = source
            try:
                await services.owners.check(video, principal, ex.route)
            except ForeignJob as foreign:  # as the upstream answers an edit of no job
                decoyed = edits.with_decoy(body, written, foreign)
                reply = await decoy_call(
                    services, ex, foreign, lambda v: path, query=query, body=decoyed
                )
                return reply_response(ex, reply, services.clock())
        if doc is None:
            provider = model_provider(services, fields.get("model"))
        provider = provider or (source[0].provider if source else None)
        provider = provider or edits.named_provider(
            query, ex.header(b"x-model-provider"), services.rules
        )
    else:
        path = route.prefix
    ex.provider = provider or ""

    budget = services.budget

    async def upstream() -> Reply:
        # Inside the idempotent call: a replay never reserves again.
        reservation = (  # or 429
            await budget.reserve(principal, doc, ex.headers) if budget.enabled else None
        )
        try:
            reply, answer = await call_json(
                services, ex, path, provider, query=query, body=body, drop=replace, extra=extra
            )
        except NotSent:
            await budget.cancel(reservation)  # nothing sent (a timeout may have created)
            raise
        if not 200 <= reply.status < 300:
            await budget.cancel(reservation)  # refused upstream: nothing runs or is spent
            return reply
        await services.owners.record(answer, principal)  # before a replay hands the id out
        job_id = answer.get("id") if answer is not None else None
        if reservation is not None and isinstance(job_id, str):
            await budget.confirm(reservation, job_id, answer)
            follow_counted(services, job_id, route.family, ex.headers)
        limits = budget.headers(reservation)
        return Reply(reply.status, [*reply.headers, *limits], reply.body) if limits else reply

    if idempotency_key is None:
        reply = await upstream()
    else:
        fingerprint = idempotency.request_hash(
            f"{path}?{query.decode('latin-1')}", content_type, body, doc
        )
        reply = await services.idempotency.run(principal, idempotency_key, fingerprint, upstream)
    replay = idempotency.REPLAYED in reply.headers
    if webhook is not None and 200 <= reply.status < 300 and not replay:
        await follow_new_job(services, ex, route, reply, webhook)
    return reply_response(ex, reply, services.clock())


def model_provider(services: Services, model: Any) -> str | None:
    """The provider a ``provider/model`` name routes to (validated: 400 if bad)."""
    if not isinstance(model, str) or "/" not in model:
        return None
    try:
        return normalize_provider(model.partition("/")[0], services.rules)
    except InvalidVideoId as exc:
        raise ProxyError(400, f"model: {exc}", param="model") from None


async def follow_new_job(
    services: Services, ex: Exchange, route: Route, reply: Reply, webhook: Endpoint
) -> None:
    """Follow the job this create (or remix) answered with, polling as its creator."""
    doc = parse_json_object(reply.body)
    job_id = doc.get("id") if doc is not None else None
    if not isinstance(job_id, str):
        return
    try:
        video = parse_decoded(job_id, services.rules)
    except InvalidVideoId:
        return
    key = cache_key(route.family, video.canonical, services.owners.principal(ex.headers))
    await services.webhooks.follow_new(key, video.canonical, route.family, webhook, ex.headers)


def follow_counted(
    services: Services, job_id: str, family: str, headers: list[tuple[bytes, bytes]]
) -> None:
    """Poll a job the budget counts until it ends, so that it leaves the count even
    when no client polls it (one poll per ``webhook_poll_seconds``, through the shared
    single flight and cache; the answer ends it in the count as any poll does)."""
    try:
        job = Followed("", parse_decoded(job_id, services.rules).canonical, family, "", 0, "")
    except InvalidVideoId:
        return
    poll = poll_as_creator(services, job, headers)
    budget = services.budget

    async def follow() -> None:
        deadline = services.clock() + budget.job_max
        while services.clock() < deadline:
            await asyncio.sleep(services.settings.webhook_poll_seconds)
            try:
                reply = await poll()
            except ProxyError:
                continue
            state = job_state(reply)
            if reply.status == 404 or (state is not None and state[0] in TERMINAL):
                return

    budget.follow(follow())


def poll_as_creator(
    services: Services, job: Followed, headers: list[tuple[bytes, bytes]]
) -> Callable[[], Awaitable[Reply]]:
    """A followed job's poll, with the creator's credentials, through the shared cache."""
    video = parse_decoded(job.job_id, services.rules)
    prefix = "/openai/v1/videos" if job.family == "openai" else "/v1/videos"
    retrieve = Route(Kind.RETRIEVE, job.family, prefix + "/{video_id}")
    ex = Exchange("GET", prefix, request_id(None), headers, route=retrieve.template)
    return Lookup(services, ex, retrieve, video, {"query_string": b""}).poll


async def delete(request: Request) -> Response:
    services, ex, route, video = addressed(request)
    query = request.scope.get("query_string", b"")
    try:
        await services.owners.check(video, services.owners.principal(ex.headers), ex.route)
    except ForeignJob as foreign:  # as the upstream answers a delete of no job
        reply = await decoy_call(
            services, ex, foreign, lambda v: f"{route.prefix}/{v.upstream_segment}", query=query
        )
        return reply_response(ex, reply, services.clock())
    reply, _ = await call_json(
        services, ex, f"{route.prefix}/{video.upstream_segment}", video.provider,
        query=request.scope.get("query_string", b""),
    )  # fmt: skip
    if 200 <= reply.status < 300:
        # Before answering, so the client's next poll cannot hit a stale entry.
        await services.cache.delete_video(video.canonical)
        await services.stale.deleted(video.canonical)
        await services.budget.deleted(video.canonical)
        await services.content.forget(video.canonical)  # every stored variant
    return reply_response(ex, reply, services.clock())

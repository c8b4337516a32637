"""One upstream call on behalf of a client: headers built (not copied), the answer read,
its ids made canonical, the job statuses it reveals fed to the tracker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import headers as hdr
from .contract import violations
from .decoy import ForeignJob
from .errors import ProxyError
from .exchange import Exchange, Reply
from .ids import InvalidVideoId, VideoId, parse_segment
from .policy import TERMINAL
from .rewrite import canonicalize_ids, dumps, parse_json_object
from .services import Services
from .transitions import provider_label
from .upstream import UpstreamCall, UpstreamResponse

log = logging.getLogger("proxy")

# Never forwarded: the proxy writes its own (X-Forwarded-*, X-Request-ID, Host).
_STRIP_FROM_REQUEST = frozenset(
    {b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
     b"x-proxy-webhook"}
)  # fmt: skip
_STRIP_FROM_ANSWER = frozenset({b"content-length", b"x-request-id"})
# Upstream JSON answers are read whole; anything larger is refused with 502.
MAX_JSON_ANSWER_BYTES = 256 * 1024 * 1024


def video_id(services: Services, segment: str) -> VideoId:
    try:
        return parse_segment(segment, services.rules)
    except InvalidVideoId as exc:
        raise ProxyError(400, str(exc), param="video_id") from None


def forward_headers(
    ex: Exchange, *, drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    headers = hdr.forwardable(ex.headers, also=_STRIP_FROM_REQUEST | drop)
    prior = ex.header(b"x-forwarded-for")
    if ex.client:
        ip = ex.client[0].encode()
        headers.append((b"x-forwarded-for", prior + b", " + ip if prior else ip))
    elif prior:
        headers.append((b"x-forwarded-for", prior))
    headers.append((b"x-forwarded-proto", ex.scheme.encode()))
    host = ex.header(b"host")
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append((b"x-request-id", ex.request_id.encode()))
    return headers


def answer_headers(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower(), v)
        for k, v in hdr.strip_hop_by_hop(response.raw_headers, also=_STRIP_FROM_ANSWER)
    ]


async def call_json(
    services: Services,
    ex: Exchange,
    path: str,
    provider: str | None,
    *,
    query: bytes,
    body: bytes | None = None,
    retry: bool = False,
    drop: frozenset[bytes] = frozenset(),
    extra: list[tuple[bytes, bytes]] | None = None,
) -> tuple[Reply, dict[str, Any] | None]:
    """One upstream JSON call; the answer with canonical ids, and its parsed body."""
    # No Accept-Encoding: JSON answers come back plain, ready to parse and cache.
    headers = forward_headers(ex, drop=drop | {b"accept-encoding"})
    headers.extend(extra or ())
    call = UpstreamCall(
        ex.method, path, query, headers, body, retry_idempotent=retry, route=ex.route
    )
    started = time.perf_counter()
    response, raw = await services.upstream.fetch(call, MAX_JSON_ANSWER_BYTES)
    ex.upstream_ms = round((time.perf_counter() - started) * 1000, 3)
    ok = 200 <= response.status_code < 300
    kind = _SHAPES.get((ex.method, ex.route)) if ok else None
    out, doc, drift = fix_answer(services, response, raw, provider, kind, ex.route)
    if doc is not None and ok:
        await track_statuses(services, doc, ex)
    return Reply(response.status_code, answer_headers(response), out, drift=drift), doc


# Which documented shape a 2xx answer has, by (method, route template).
_SHAPES = {
    (method, prefix + suffix): kind
    for prefix in ("/v1/videos", "/openai/v1/videos")
    for method, suffix, kind in (
        ("GET", "", "list"), ("POST", "", "new"), ("POST", "/edits", "new"),
        ("POST", "/{video_id}/remix", "new"), ("GET", "/{video_id}", "job"),
    )
}  # fmt: skip


async def decoy_call(
    services: Services,
    ex: Exchange,
    foreign: ForeignJob,
    path_of: Callable[[VideoId], str],
    *,
    query: bytes,
    body: bytes | None = None,
    retry: bool = False,
) -> Reply:
    """Another tenant's job: the upstream's answer for a decoy of it (see ``decoy``),
    or, when no decoy can be made, the proxy's own not-found answer."""
    decoy = foreign.decoy
    if decoy is None:
        raise foreign
    reply, _ = await call_json(
        services, ex, path_of(decoy.video), decoy.video.provider, query=query, body=body,
        retry=retry,
    )  # fmt: skip
    return decoy.reply(reply)


async def content_completed(
    services: Services, ex: Exchange, video: str, doc: dict[str, Any]
) -> None:
    """A job seen completed: its content may now be stored (and, with
    ``content_prefetch``, is fetched now in the background, as this tenant)."""
    if await services.content.saw_completed(video, doc) and services.settings.content_prefetch:
        from .endpoints.content import prefetch  # endpoints build on the forwarder

        services.content.in_background(prefetch(services, ex, video))


def fix_answer(
    services: Services,
    response: UpstreamResponse,
    raw: bytes,
    provider: str | None,
    kind: str | None = None,
    route: str = "other",
) -> tuple[bytes, dict[str, Any] | None, bool]:
    """Canonical ids in a JSON answer (the raw bytes when nothing changes), its parsed
    body, and whether it broke the documented shape of ``kind`` (counted, logged)."""
    if (response.header("content-encoding") or "identity") != "identity":
        return raw, None, False  # the upstream ignored our identity request: leave it alone
    if "json" not in (response.header("content-type") or "json"):
        return raw, None, False
    doc = parse_json_object(raw)
    drift = False
    if doc is not None and kind is not None:
        found = violations(doc, kind)
        if found:
            services.drift.report(route, found)
            drift = True
    if doc is not None and not isinstance(doc.get("status", ""), str):
        return raw, None, drift  # odd JSON (a list or object status): relayed verbatim
    if doc is None or not canonicalize_ids(doc, provider, services.rules):
        return raw, doc, drift
    return dumps(doc), doc, drift


async def track_statuses(services: Services, doc: dict[str, Any], ex: Exchange) -> None:
    """Feed every job status an answer reveals (one job, or a list) to the tracker; a
    job answered ``completed`` on its own (not in a list) may be stored (see content)."""
    data = doc.get("data")
    items = data if isinstance(data, list) else [doc]
    single = items is not data
    try:
        for item in items:
            if not isinstance(item, dict):
                continue
            video, status = item.get("id"), item.get("status")
            if isinstance(video, str) and isinstance(status, str):  # odd JSON: skipped
                provider = video.rpartition(":")[2]
                await services.tracker.observe(video, provider, item)
                if status in TERMINAL and services.budget.enabled:
                    await services.budget.ended(video, status, provider_label(provider), item)
                if status == "completed" and single and services.content.enabled:
                    await content_completed(services, ex, video, item)
    except Exception:  # metrics must never fail a request
        log.exception("status tracking failed")

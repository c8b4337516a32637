"""Route classification from the raw request path (pure, no I/O).

Routing works on the *raw* path so that ``%2F`` inside a video id is not a
separator, while every literal segment (``v1``, ``videos``, ``content``…) is
compared after decoding, so odd encodings such as ``vid%65os`` cannot slip a
video route past validation as pass-through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

from .errors import ProxyError

_MAX_DECODE_ROUNDS = 8
_CONTROL = re.compile("[\x00-\x1f\x7f]")


class Kind(StrEnum):
    CREATE = "create"
    LIST = "list"
    RETRIEVE = "retrieve"
    DELETE = "delete"
    REMIX = "remix"
    CONTENT = "content"
    EVENTS = "events"
    EDITS = "edits"
    VIDEO_PASSTHROUGH = "video_passthrough"  # a route under …/videos the proxy does not know
    PASSTHROUGH = "passthrough"
    HEALTHZ = "healthz"
    READYZ = "readyz"
    METRICS = "metrics"
    ADMIN_PURGE_ONE = "admin_purge_one"
    ADMIN_PURGE_ALL = "admin_purge_all"
    ADMIN_WEBHOOKS = "admin_webhooks"
    ADMIN_TENANTS = "admin_tenants"
    ADMIN_REDELIVER = "admin_redeliver"


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    family: str  # "native", "openai" or "" (not a video route)
    template: str  # metric label: a template, never a raw path
    id_segment: str | None = None  # raw, still percent-encoded
    rest: str = ""  # VIDEO_PASSTHROUGH: the raw path after the id (or after /videos)

    @property
    def prefix(self) -> str:
        return "/openai/v1/videos" if self.family == "openai" else "/v1/videos"


_VIDEO_SHAPES: dict[tuple[str, int, str | None], Kind] = {
    ("POST", 0, None): Kind.CREATE,
    ("GET", 0, None): Kind.LIST,
    ("GET", 1, None): Kind.RETRIEVE,
    ("DELETE", 1, None): Kind.DELETE,
    ("POST", 2, "remix"): Kind.REMIX,
    ("GET", 2, "content"): Kind.CONTENT,
    ("HEAD", 2, "content"): Kind.CONTENT,
    ("GET", 2, "events"): Kind.EVENTS,
}
_TEMPLATES = {
    Kind.CREATE: "",
    Kind.LIST: "",
    Kind.RETRIEVE: "/{video_id}",
    Kind.DELETE: "/{video_id}",
    Kind.REMIX: "/{video_id}/remix",
    Kind.CONTENT: "/{video_id}/content",
    Kind.EVENTS: "/{video_id}/events",
}


def fully_decode(path: str) -> str:
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(path)
        if decoded == path:
            return path
        path = decoded
    return path


def not_found(message: str = "no such route on this proxy") -> ProxyError:
    return ProxyError(404, message)


def classify(method: str, raw_path: str) -> Route:
    """Map a request to a route, or raise ProxyError (400/404/405)."""
    if not raw_path.startswith("/"):
        raise ProxyError(400, "request path must start with /")
    decoded = fully_decode(raw_path)
    if any(seg in (".", "..") for seg in decoded.split("/")):
        raise ProxyError(400, "request path must not contain dot-segments")
    if _CONTROL.search(decoded):
        raise ProxyError(400, "request path must not contain control characters")

    raw_segments = raw_path.split("/")[1:]
    segments = [unquote(s) for s in raw_segments]
    if len(segments) == 1:
        fixed = {"healthz": Kind.HEALTHZ, "readyz": Kind.READYZ, "metrics": Kind.METRICS}
        kind = fixed.get(segments[0])
        if kind is not None:
            if method not in ("GET", "HEAD"):
                raise ProxyError(405, f"{method} is not allowed on /{segments[0]}")
            return Route(kind, "", "/" + segments[0])
    if segments == ["admin", "tenants"]:  # any method, as for the cache routes
        return Route(Kind.ADMIN_TENANTS, "", "/admin/tenants")
    if segments[:2] == ["admin", "webhooks"]:  # any method, as for the cache routes
        if len(segments) == 2:
            return Route(Kind.ADMIN_WEBHOOKS, "", "/admin/webhooks")
        if len(segments) == 5 and segments[2] == "events" and segments[4] == "redeliver":
            return Route(
                Kind.ADMIN_REDELIVER, "", "/admin/webhooks/events/{event_id}/redeliver",
                raw_segments[3],
            )  # fmt: skip
        raise not_found()
    if segments[:2] == ["admin", "cache"]:
        # Any method: the endpoint answers 404 for all of them while the admin surface
        # is disabled (indistinguishable from a missing route), else 405 for non-DELETE.
        if len(segments) == 2:
            return Route(Kind.ADMIN_PURGE_ALL, "", "/admin/cache")
        if len(segments) == 4 and segments[2] == "videos" and raw_segments[3]:
            return Route(
                Kind.ADMIN_PURGE_ONE, "", "/admin/cache/videos/{video_id}", raw_segments[3]
            )
        raise not_found()

    if segments[:2] == ["v1", "videos"]:
        family, rest = "native", 2
    elif segments[:3] == ["openai", "v1", "videos"]:
        family, rest = "openai", 3
    elif segments and segments[0] in ("v1", "openai"):
        # Anything that decodes to a video route but did not match one exactly is an
        # odd encoding of it (``%2F``, ``//``: Bifrost's server decodes the path and
        # merges slashes): never pass it through unvalidated.
        merged = "/" + "/".join(s for s in decoded.split("/") if s)
        if merged.startswith(("/v1/videos", "/openai/v1/videos")):
            raise not_found("malformed video route")
        if "" in raw_segments[1:-1]:
            raise ProxyError(400, "request path must not contain empty segments (//)")
        return Route(Kind.PASSTHROUGH, "", "passthrough")
    else:
        raise not_found()

    tail = raw_segments[rest:]
    count = len(tail)
    base = "/openai/v1/videos" if family == "openai" else "/v1/videos"
    if any(not s for s in tail):
        raise not_found("no such video route")
    if method == "OPTIONS":
        # A CORS preflight: Bifrost answers every OPTIONS with its CORS configuration,
        # so it is relayed as is (no id is acted on, so none is validated).
        return Route(Kind.PASSTHROUGH, "", "preflight")
    # The segment after "videos" is a video id when it holds a ":" (however encoded),
    # else the name of a literal route (``edits``, ``characters``, …).
    is_id = count > 0 and ":" in fully_decode(tail[0])
    if count == 1 and not is_id and segments[rest] == "edits" and method == "POST":
        return Route(Kind.EDITS, family, base + "/edits")
    action = segments[rest + 1] if count == 2 else None
    kind_or_none = _VIDEO_SHAPES.get((method, count, action)) if is_id or not count else None
    if kind_or_none is None:
        # Not one the proxy improves: forwarded (Bifrost answers it), an id in it
        # validated and ownership-checked first.
        if is_id:
            return Route(
                Kind.VIDEO_PASSTHROUGH, family, base + "/{video_id}/…", tail[0],
                "".join("/" + s for s in tail[1:]),
            )  # fmt: skip
        return Route(
            Kind.VIDEO_PASSTHROUGH, family, base + "/…", None, "".join("/" + s for s in tail)
        )
    return Route(
        kind_or_none,
        family,
        base + _TEMPLATES[kind_or_none],
        tail[0] if count else None,
    )


ROUTE = "proxy.route"  # the scope key under which a request's Route travels
_ACTIONS = {Kind.REMIX: "/remix", Kind.CONTENT: "/content", Kind.EVENTS: "/events"}


def canonical_path(route: Route, decoded_path: str) -> str:
    """The path the Starlette router matches for a classified request: the video id
    stays one still-encoded segment; pass-through keeps its (decoded) path."""
    if route.kind is Kind.PASSTHROUGH:
        return decoded_path
    if route.kind is Kind.VIDEO_PASSTHROUGH:
        # One neutral path that only the pass-through catch-all matches: a literal
        # route such as ``/v1/videos/x/remix`` must not reach the remix endpoint.
        return route.prefix + "-passthrough"
    if route.kind is Kind.EDITS:
        return route.template
    if not route.family:  # health, readiness, metrics, admin
        if route.kind is Kind.ADMIN_PURGE_ONE:
            return f"/admin/cache/videos/{route.id_segment}"
        if route.kind is Kind.ADMIN_REDELIVER:
            return f"/admin/webhooks/events/{route.id_segment}/redeliver"
        return route.template
    path = route.prefix
    if route.id_segment is not None:
        path += "/" + route.id_segment
    return path + _ACTIONS.get(route.kind, "")

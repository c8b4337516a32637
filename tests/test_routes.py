"""Route classification from raw paths (pure)."""

from __future__ import annotations

import pytest

from proxy.errors import ProxyError
from proxy.routes import Kind, classify


@pytest.mark.parametrize(
    "method, path, kind, family, template, segment",
    [
        ("POST", "/v1/videos", Kind.CREATE, "native", "/v1/videos", None),
        ("GET", "/v1/videos", Kind.LIST, "native", "/v1/videos", None),
        ("GET", "/v1/videos/a:openai", Kind.RETRIEVE, "native", "/v1/videos/{video_id}", "a:openai"),
        ("DELETE", "/v1/videos/a:openai", Kind.DELETE, "native", "/v1/videos/{video_id}", "a:openai"),
        ("POST", "/v1/videos/a:openai/remix", Kind.REMIX, "native", "/v1/videos/{video_id}/remix", "a:openai"),
        ("GET", "/v1/videos/a:openai/content", Kind.CONTENT, "native", "/v1/videos/{video_id}/content", "a:openai"),
        ("GET", "/openai/v1/videos/m%2Fx:gemini", Kind.RETRIEVE, "openai", "/openai/v1/videos/{video_id}", "m%2Fx:gemini"),
        ("POST", "/openai/v1/videos", Kind.CREATE, "openai", "/openai/v1/videos", None),
        ("GET", "/v1/vid%65os/a:openai", Kind.RETRIEVE, "native", "/v1/videos/{video_id}", "a:openai"),
        ("GET", "/v1/videos/a%2Fcontent:openai", Kind.RETRIEVE, "native", "/v1/videos/{video_id}", "a%2Fcontent:openai"),
        ("POST", "/v1/chat/completions", Kind.PASSTHROUGH, "", "passthrough", None),
        ("GET", "/openai/v1/models", Kind.PASSTHROUGH, "", "passthrough", None),
        ("GET", "/healthz", Kind.HEALTHZ, "", "/healthz", None),
        ("GET", "/readyz", Kind.READYZ, "", "/readyz", None),
        ("GET", "/metrics", Kind.METRICS, "", "/metrics", None),
        ("DELETE", "/admin/cache", Kind.ADMIN_PURGE_ALL, "", "/admin/cache", None),
        ("DELETE", "/admin/cache/videos/a:openai", Kind.ADMIN_PURGE_ONE, "", "/admin/cache/videos/{video_id}", "a:openai"),
        # Every method: the endpoint answers 404 while admin is off, 405 when on.
        ("GET", "/admin/cache", Kind.ADMIN_PURGE_ALL, "", "/admin/cache", None),
        # Today's Bifrost: edits, and routes the proxy does not know (forwarded).
        ("POST", "/v1/videos/edits", Kind.EDITS, "native", "/v1/videos/edits", None),
        ("POST", "/openai/v1/videos/edits", Kind.EDITS, "openai", "/openai/v1/videos/edits", None),
        ("GET", "/v1/videos/edits", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/…", None),
        ("POST", "/v1/videos/extensions", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/…", None),
        ("GET", "/v1/videos/characters/ch_1", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/…", None),
        ("GET", "/v1/videos/nocolon", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/…", None),
        ("POST", "/v1/videos/x/remix", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/…", None),
        ("GET", "/v1/videos/a:openai/frames", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/{video_id}/…", "a:openai"),
        ("GET", "/v1/videos/a:openai/content/x", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/{video_id}/…", "a:openai"),
        ("PUT", "/v1/videos/a:openai", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/{video_id}/…", "a:openai"),
        ("GET", "/v1/videos/a%253Aopenai", Kind.RETRIEVE, "native", "/v1/videos/{video_id}", "a%253Aopenai"),
        ("DELETE", "/v1/videos", Kind.VIDEO_PASSTHROUGH, "native", "/v1/videos/…", None),
    ],
)  # fmt: skip
def test_routes(
    method: str, path: str, kind: Kind, family: str, template: str, segment: str | None
) -> None:
    route = classify(method, path)
    if kind is Kind.VIDEO_PASSTHROUGH:  # the path forwarded: the rest after the id
        assert path.endswith(route.rest) and route.rest.count("/") < path.count("/")
    assert (route.kind, route.family, route.template, route.id_segment) == (
        kind,
        family,
        template,
        segment,
    )


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/api/config", 404),  # Bifrost's management API is never reachable
        ("GET", "/api/providers", 404),
        ("GET", "/", 404),
        ("GET", "/v2/videos", 404),
        ("GET", "/v1/../api/config", 400),
        ("GET", "/v1/%2e%2e/api/config", 400),
        ("GET", "/v1/..%2Fapi/config", 400),
        ("GET", "/v1/..%252Fapi/config", 400),
        ("GET", "/v1/videos/..%2F..%2Fapi:openai", 400),
        ("GET", "/v1/videos/.", 400),
        ("GET", "/v1/videos%2Fa:openai", 404),  # an odd encoding of a video route
        ("GET", "/v1%2Fvideos/a:openai", 404),
        ("GET", "/v1/videos/", 404),
        ("GET", "/v1/videos//content", 404),
        # Empty segments and encoded slashes never turn a video route into pass-through.
        ("GET", "/v1//videos/NOT-AN-ID", 404),
        ("GET", "/openai//v1/videos/a:openai", 404),
        ("GET", "/openai/v1//videos/a:openai", 404),
        ("GET", "/v1/%2Fvideos/a:openai", 404),
        ("GET", "/v1/%252Fvideos/a:openai", 404),
        ("GET", "/openai/%2F/v1/videos", 404),
        ("POST", "/v1//chat/completions", 400),
        ("POST", "/healthz", 405),
        ("GET", "/v1/x%0Ay", 400),
        ("GET", "relative", 400),
    ],
)
def test_rejected_paths(method: str, path: str, status: int) -> None:
    with pytest.raises(ProxyError) as info:
        classify(method, path)
    assert info.value.status == status

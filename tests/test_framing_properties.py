"""Property test of the upstream edge over real sockets: random request framings from a
raw-socket client, through the proxy (the console script's protocol), to a raw upstream
that reads requests the naive way (trusting Content-Length and chunked framing).

For every request: no upstream request carries a body the client did not send for it,
framing headers upstream match the body, at most one upstream request is made, and no
path outside the video routes and the pass-through prefixes is reached."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.protocol import GuardedHttpToolsProtocol
from tests.chaos import Chaos, chaos_upstream
from tests.conftest import make_settings
from tests.rawhttp import connect
from tests.servers import serve_in_thread
from tests.test_properties import video_target_shape

VIDEO_PREFIXES = ("/v1/videos", "/openai/v1/videos")
SEGMENT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="/?#"), max_size=12
)
PATHS = st.one_of(
    st.sampled_from(
        [
            "/v1/videos",
            "/openai/v1/videos",
            "/v1/videos/video_1:openai",
            "/v1/videos/video_1:openai/content",
            "/v1/videos/video_1:openai/remix",
            "/openai/v1/videos/m%2Fx:gemini",
            "/v1/videos/NOT-AN-ID",
            "/v1/chat/completions",
            "/openai/v1/models",
            "/v1//videos/x:openai",
            "/v1/videos//x:openai",
            "/openai//v1/videos",
            "/v1/%2Fvideos/x:openai",
            "/v1/%252Fvideos/x:openai",
            "/api/governance/virtual-keys",
            "/v1/../api/config",
            "/v1/%2e%2e/api/config",
            "/v1/x/..%2F..%2Fapi",
            "//v1/chat/completions",
            "/v1//chat/completions",
        ]
    ),
    st.tuples(st.sampled_from(["/v1/", "/openai/", "/v1/videos/"]), SEGMENT, SEGMENT).map(
        lambda t: t[0] + t[1] + "/" + t[2]
    ),
)
FRAMINGS = st.sampled_from(["none", "length", "zero", "chunked", "chunked+trailer"])
BODIES = st.one_of(st.binary(max_size=300), st.just(b'{"model":"openai/sora-2","prompt":"a cat"}'))


@pytest.fixture(scope="module")
def edge() -> Iterator[tuple[Chaos, str]]:
    with chaos_upstream() as chaos:
        app = create_app(make_settings(chaos.url))
        with serve_in_thread(app, http=GuardedHttpToolsProtocol, ws="none") as server:
            yield chaos, server.url


def frame(method: str, path: str, framing: str, body: bytes) -> tuple[bytes, bytes]:
    """The raw request, and the body it carries."""
    head = f"{method} {path} HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
    head += "Connection: close\r\n"
    if framing == "none":
        return head.encode() + b"\r\n", b""
    if framing == "zero":
        return head.encode() + b"Content-Length: 0\r\n\r\n", b""
    if framing == "length":
        return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body, body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:100], body[100:]) if p)
    trailer = b"X-Trailer: smuggled\r\n" if framing == "chunked+trailer" else b""
    request = head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n"
    return request + trailer + b"\r\n", body


def merged(target: str) -> str:
    """The path as a lenient upstream server sees it: decoded, slashes merged."""
    path = target.split("?")[0]
    for _ in range(4):
        path = unquote(path)
    return "/" + "/".join(s for s in path.split("/") if s)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS"]),
    path=PATHS,
    framing=FRAMINGS,
    body=BODIES,
)
def test_no_framing_reaches_upstream_with_a_body_or_path_it_should_not(
    edge: tuple[Chaos, str], method: str, path: str, framing: str, body: bytes
) -> None:
    chaos, url = edge
    chaos.seen.clear()
    request, sent_body = frame(method, path, framing, body)
    with connect(url) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # refused before the body was read: the answer came first
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    status = status_of(answer)
    assert status < 500, answer[:300]
    assert len(chaos.seen) <= 1, [(s.method, s.target) for s in chaos.seen]
    if not chaos.seen:
        head = answer.partition(b"\r\n\r\n")[0].lower()
        if b"x-cache-status: hit" in head or b"x-cache-status: coalesced" in head:
            return  # answered from the cache
        assert 400 <= status < 500, answer[:300]
        envelope: dict[str, Any] = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert envelope["status_code"] == status
        return
    (seen,) = chaos.seen
    assert seen.method == method
    where = merged(seen.target)
    assert where.startswith(("/v1/", "/openai/")) and not where.startswith("/api"), seen.target
    assert ".." not in where.split("/"), seen.target
    if where.startswith(VIDEO_PREFIXES):
        # Only ever a validated, canonical video id: never an odd encoding of a route.
        assert seen.target.startswith(VIDEO_PREFIXES), seen.target
        # (A CORS preflight is relayed as sent: no id is acted on, none is validated.)
        known = method != "OPTIONS" and video_target_shape(seen.target, method)
        if known and method in ("GET", "DELETE"):
            assert seen.body == b""
    if seen.body or seen.header(b"content-length") or seen.header(b"transfer-encoding"):
        assert seen.body == sent_body or json.loads(seen.body) == json.loads(sent_body)
    length = seen.header(b"content-length")
    assert length is None or int(length) == len(seen.body)
    assert not (length and seen.header(b"transfer-encoding"))
    assert b"smuggled" not in seen.head


def test_the_raw_client_really_sends_chunked_trailers(edge: tuple[Chaos, str]) -> None:
    """The property above only means something if its framings reach the proxy intact."""
    chaos, url = edge
    chaos.seen.clear()
    request, _ = frame("POST", "/v1/chat/completions", "chunked+trailer", b"x" * 150)
    with connect(url) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert chaos.seen[0].body == b"x" * 150

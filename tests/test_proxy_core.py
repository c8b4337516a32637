"""The core proxy over real sockets, in front of the simulator.

Most tests run the proxy app on uvicorn in a thread (real loopback sockets); the first
group runs the real console script, as a user would.
"""

from __future__ import annotations

import gzip
import signal
import threading
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from proxy.simulator.app import expected_content
from tests.conftest import Upstream
from tests.servers import ProxyProcess, free_port, serve_in_thread

ALICE = {"Authorization": "Bearer sk-bf-alice"}
BOB = {"Authorization": "Bearer sk-bf-bob"}


def create(
    base: str, model: str = "openai/sora-2", headers: dict[str, str] = ALICE, **extra: Any
) -> dict[str, Any]:
    r = httpx.post(
        f"{base}/v1/videos", json={"model": model, "prompt": "a cat", **extra}, headers=headers
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_envelope(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status_code"] == status and body["is_bifrost_error"] is False
    assert fragment in body["error"]["message"], body
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]


# -- the console script, end to end ---------------------------------------------------------
def test_job_lifecycle_through_console_script(
    proxy_process: ProxyProcess, upstream: Upstream
) -> None:
    base = proxy_process.url
    job = create(base)
    assert job["status"] == "queued" and job["id"].endswith(":openai")
    vid = job["id"]
    first = httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE)
    assert (first.json()["status"], first.headers["x-cache-status"]) == ("queued", "MISS")
    upstream.clock.advance(15)
    # Within poll_coalesce_seconds a poll is answered from the last upstream answer...
    again = httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE)
    assert (again.json()["status"], again.headers["x-cache-status"]) == ("queued", "COALESCED")
    assert again.content == first.content and "age" in again.headers
    # ...unless the client asks for a fresh one.
    fresh = httpx.get(f"{base}/v1/videos/{vid}", headers={**ALICE, "Cache-Control": "no-cache"})
    assert (fresh.json()["status"], fresh.headers["x-cache-status"]) == ("in_progress", "BYPASS")
    upstream.clock.advance(30)
    miss = httpx.get(f"{base}/v1/videos/{vid}", headers={**ALICE, "Cache-Control": "no-cache"})
    done = miss.json()
    assert done["status"] == "completed" and done["expires_at"] > done["completed_at"]
    calls = upstream.calls
    hit = httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE)
    assert hit.headers["x-cache-status"] == "HIT" and upstream.calls == calls
    cache_debug = hit.json()["extra_fields"].pop("cache_debug")
    assert cache_debug["cache_hit"] is True and cache_debug["hit_type"] == "direct"
    assert hit.json() | {"extra_fields": done["extra_fields"]} == done
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    native = vid.rpartition(":")[0]
    assert r.content == expected_content(native, "video", upstream.sim.state.config.content_bytes)
    assert r.headers["content-type"] == "video/mp4"
    r = httpx.get(f"{base}/v1/videos/{vid}/content?variant=thumbnail", headers=ALICE)
    assert r.headers["content-type"] == "image/webp"
    listing = httpx.get(f"{base}/v1/videos?provider=openai", headers=ALICE).json()
    assert [item["id"] for item in listing["data"]] == [vid]
    remix = httpx.post(
        f"{base}/v1/videos/{vid}/remix", json={"prompt": "a dog"}, headers=ALICE
    ).json()
    assert remix["remixed_from_video_id"] == vid and remix["id"] != vid
    deleted = httpx.delete(f"{base}/v1/videos/{vid}", headers=ALICE).json()
    assert deleted == {**deleted, "id": vid, "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE).status_code == 404


def test_sigterm_exits_zero(proxy_process: ProxyProcess) -> None:
    proxy_process.process.send_signal(signal.SIGTERM)
    assert proxy_process.process.wait(15) == 0


def test_other_tenant_gets_upstream_404(proxy: str) -> None:
    vid = create(proxy)["id"]
    assert httpx.get(f"{proxy}/v1/videos/{vid}", headers=BOB).status_code == 404
    assert httpx.get(f"{proxy}/v1/videos/{vid}", headers=ALICE).status_code == 200


def test_openai_family_is_forwarded_to_the_same_path(proxy: str, upstream: Upstream) -> None:
    r = httpx.post(
        f"{proxy}/openai/v1/videos", json={"prompt": "x", "model": "openai/sora-2"}, headers=ALICE
    )
    vid = r.json()["id"]
    assert httpx.get(f"{proxy}/openai/v1/videos/{vid}", headers=ALICE).status_code == 200
    assert upstream.sim.state.paths[-1] == f"/openai/v1/videos/{vid}"


# -- ids --------------------------------------------------------------------------------------
def test_odd_encodings_reach_upstream_canonical(proxy: str, upstream: Upstream) -> None:
    vid = create(proxy, model="gemini/veo-3")["id"]
    assert "%2F" in vid and vid.endswith(":gemini")
    double = vid.replace("%2F", "%252F")  # what the OpenAI SDK sends
    for form in (vid, double, vid.replace(":gemini", ":Gemini"), vid.replace(":", "%3A")):
        r = httpx.get(f"{proxy}/v1/videos/{form}", headers=ALICE)
        assert r.status_code == 200 and r.json()["id"] == vid, form
        assert upstream.sim.state.paths[-1] == "/v1/videos/" + vid.replace("%", "%25")


def test_bare_ids_in_answers_get_the_provider(proxy: str, upstream: Upstream) -> None:
    body = b'{"id":"video_1","object":"video","status":"queued","remixed_from_video_id":"video_0"}'
    upstream.sim.state.faults.append(
        {"status": 200, "body": body, "headers": {"content-type": "application/json"}}
    )
    doc = httpx.get(f"{proxy}/v1/videos/video_1:openai").json()
    assert (doc["id"], doc["remixed_from_video_id"]) == ("video_1:openai", "video_0:openai")
    listing = b'{"object":"list","data":[{"id":"v1"},{"id":"v2:runway"}],"first_id":"v1","last_id":"v2:runway","has_more":false}'
    upstream.sim.state.faults.append(
        {"status": 200, "body": listing, "headers": {"content-type": "application/json"}}
    )
    doc = httpx.get(f"{proxy}/v1/videos?provider=runway").json()
    assert [d["id"] for d in doc["data"]] == ["v1:runway", "v2:runway"]
    assert (doc["first_id"], doc["last_id"]) == ("v1:runway", "v2:runway")


def test_answers_needing_no_rewrite_are_byte_identical(proxy: str, upstream: Upstream) -> None:
    body = b'{ "id" : "video_1:openai",\n "status":"queued", "progress": 1.50 }'
    upstream.sim.state.faults.append(
        {"status": 200, "body": body, "headers": {"content-type": "application/json"}}
    )
    r = httpx.get(f"{proxy}/v1/videos/video_1:openai")
    assert r.content == body and r.headers["content-length"] == str(len(body))


# -- bad input: 4xx envelope and zero upstream calls -----------------------------------------
BAD_REQUESTS = [
    ("GET", "/v1/videos/:openai", None, {}, 400, "id:provider format"),
    ("GET", "/v1/videos/video_1:", None, {}, 400, "id:provider format"),
    ("GET", "/v1/videos/bad%zzid:openai", None, {}, 400, "invalid video_id encoding"),
    ("GET", "/v1/videos/a%0Db:openai", None, {}, 400, "control characters"),
    ("GET", "/v1/videos/a%00b:openai", None, {}, 400, "control characters"),
    ("GET", "/v1/videos/" + "x" * 600 + ":openai", None, {}, 400, "longer than 512"),
    ("GET", "/v1/videos/video_1:Not%20A%20Provider", None, {}, 400, "invalid provider"),
    ("GET", "/v1/videos/v:openai/content?variant=GIF", None, {}, 400, "variant must be 1 to 32"),
    ("GET", "/v1/videos/v:openai/content?variant=" + "a" * 33, None, {}, 400, "variant must be"),
    ("GET", "/v1/videos/a%253Aopenai", None, {}, 400, "id:provider format"),
    ("PUT", "/v1/videos/nocolon:", None, {}, 400, "id:provider format"),
    ("GET", "/v1/videos/:openai/frames", None, {}, 400, "id:provider format"),
    ("POST", "/v1/videos/edits", b'{"prompt":"p","video":{"id":"nocolon"}}', {}, 400, "video.id"),
    ("POST", "/v1/videos/edits", b'{"prompt":"p","video":{"id":7}}', {}, 400, "video.id"),
    ("POST", "/v1/videos/edits", b"[]", {}, 400, "JSON object"),
    ("GET", "/v1/videos?provider=openai&limit=0", None, {}, 400, "limit must be"),
    ("GET", "/v1/videos?provider=openai&limit=101", None, {}, 400, "limit must be"),
    ("GET", "/v1/videos?provider=openai&limit=ten", None, {}, 400, "limit must be"),
    ("GET", "/v1/videos?provider=openai&order=up", None, {}, 400, "order must be"),
    ("GET", "/v1/videos?provider=Open%20AI", None, {}, 400, "provider"),
    ("GET", "/v1/videos?provider=openai&after=nocolon", None, {}, 400, "after"),
    ("GET", "/v1/videos?provider=openai&provider=gemini", None, {}, 400, "more than once"),
    ("POST", "/v1/videos", b"{not json", {"content-type": "application/json"}, 400, "valid JSON"),
    ("POST", "/v1/videos", b"[1,2]", {"content-type": "application/json"}, 400, "JSON object"),
    ("POST", "/v1/videos/v:openai/remix", b"nope", {}, 400, "valid JSON"),
    ("GET", "/api/config", None, {}, 404, "no such route"),
    ("GET", "/v1/%2e%2e/api/config", None, {}, 400, "dot-segments"),
    ("GET", "/v1/videos/..%2F..%2Fapi:openai", None, {}, 400, "dot-segments"),
    ("GET", "/v1/videos/..%252Fapi:openai", None, {}, 400, "dot-segments"),
    ("GET", "/", None, {}, 404, "no such route"),
]


@pytest.mark.parametrize("method, path, body, headers, status, fragment", BAD_REQUESTS)
def test_bad_input_is_rejected_before_upstream(
    proxy: str, upstream: Upstream, method: str, path: str, body: bytes | None,
    headers: dict[str, str], status: int, fragment: str,
) -> None:  # fmt: skip
    with httpx.Client() as client:
        request = client.build_request(method, proxy + "/", content=body, headers=headers)
        request.url = request.url.copy_with(raw_path=path.encode())
        r = client.send(request)
    assert_envelope(r, status, fragment)
    assert upstream.calls == 0


RESTRICTED = [
    ("GET", "/v1/videos/video_1:acme", None),
    ("GET", "/v1/videos?provider=acme", None),
    ("POST", "/v1/videos", b'{"model":"acme/x","prompt":"p"}'),
    ("POST", "/v1/videos/edits", b'{"prompt":"p","video":{"id":"v:acme"}}'),
]


@pytest.mark.parametrize("method, path, body", RESTRICTED)
def test_allowed_providers_restricts_when_set(
    make_proxy: Any, upstream: Upstream, method: str, path: str, body: bytes | None
) -> None:
    base = make_proxy(allowed_providers=["openai", "gemini"])
    r = httpx.request(method, base + path, content=body, headers=ALICE)
    assert_envelope(r, 400, "not allowed")
    assert upstream.calls == 0


@pytest.mark.parametrize(
    "provider", ["runware", "runway", "replicate", "vertex", "acme-custom", "new.provider"]
)
def test_any_well_formed_provider_is_accepted_by_default(
    proxy: str, upstream: Upstream, provider: str
) -> None:
    r = httpx.get(f"{proxy}/v1/videos/task-123:{provider}", headers=ALICE)
    assert r.status_code == 404  # the upstream's own answer: the job does not exist there
    assert upstream.sim.state.requests[-1].raw_path == f"/v1/videos/task-123:{provider}"


def test_raw_dot_dot_in_request_line_is_rejected(proxy: str, upstream: Upstream) -> None:
    import socket

    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"GET /v1/videos/../../api/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert upstream.calls == 0


def test_body_over_max_request_bytes_is_413(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(max_request_bytes=1000)
    body = orjson.dumps({"prompt": "x" * 5000})
    assert_envelope(httpx.post(f"{base}/v1/videos", content=body), 413, "max_request_bytes")

    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 500  # no Content-Length: caught while reading

    assert_envelope(httpx.post(f"{base}/v1/videos", content=chunks()), 413, "max_request_bytes")
    assert upstream.calls == 0
    # Pass-through streams the body: the upstream request is cut off mid-body, so the
    # upstream never receives a complete request.
    assert_envelope(
        httpx.post(f"{base}/v1/chat/completions", content=chunks()), 413, "max_request_bytes"
    )
    assert upstream.sim.state.requests == []


# -- forwarding ---------------------------------------------------------------------------------
def test_headers_forwarded_and_hop_by_hop_stripped(proxy: str, upstream: Upstream) -> None:
    headers = {
        **ALICE, "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "5",
        "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Bf-Eh-Foo": "bar",
        "X-Request-ID": "req-123", "X-Forwarded-For": "10.1.1.1",
    }  # fmt: skip
    r = httpx.get(f"{proxy}/v1/videos?provider=openai&limit=5", headers=headers)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-123"
    seen = upstream.sim.state.requests[-1]
    for gone in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert seen.header(gone) is None, gone
    assert seen.header("authorization") == "Bearer sk-bf-alice"
    assert seen.header("x-bf-eh-foo") == "bar"
    assert seen.header("x-request-id") == "req-123"
    assert seen.header("x-forwarded-for") == "10.1.1.1, 127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == proxy.removeprefix("http://")
    assert seen.header("host") == upstream.url.removeprefix("http://")
    assert seen.query == "provider=openai&limit=5"
    fresh = httpx.get(f"{proxy}/healthz").headers["x-request-id"]
    assert len(fresh) == 32 and fresh != "req-123"


def test_upstream_errors_pass_through_verbatim(proxy: str, upstream: Upstream) -> None:
    body = b'{"is_bifrost_error":false,"status_code":429,"error":{"message":"slow down"}}'
    upstream.sim.state.faults.append(
        {
            "status": 429,
            "body": body,
            "headers": {"retry-after": "7", "content-type": "application/json"},
        }
    )
    r = httpx.get(f"{proxy}/v1/videos/v:openai")
    assert (r.status_code, r.content, r.headers["retry-after"]) == (429, body, "7")
    for status in (500, 502, 503):
        upstream.sim.state.faults.append({"status": status, "body": b"oops"})
        r = httpx.get(f"{proxy}/v1/videos/v:openai")
        assert (r.status_code, r.content) == (status, b"oops")


def test_redirects_are_not_followed(proxy: str, upstream: Upstream) -> None:
    upstream.sim.state.faults.append(
        {"status": 302, "headers": {"location": "http://example.invalid/x"}}
    )
    r = httpx.get(f"{proxy}/v1/videos/v:openai")
    assert r.status_code == 302 and r.headers["location"] == "http://example.invalid/x"
    assert upstream.calls == 1


def test_connect_failure_is_502_and_readyz_503(make_proxy: Any) -> None:
    base = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    assert_envelope(httpx.get(f"{base}/v1/videos/v:openai"), 502, "could not connect")
    assert_envelope(httpx.post(f"{base}/v1/videos", json={"prompt": "x"}), 502, "could not connect")
    assert_envelope(httpx.get(f"{base}/readyz"), 503, "upstream unreachable")
    assert httpx.get(f"{base}/healthz").status_code == 200


def test_upstream_timeout_is_504(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(upstream_timeout_seconds=0.3)
    upstream.sim.state.faults.append({"delay": 3})
    assert_envelope(httpx.get(f"{base}/v1/videos/v:openai"), 504, "timed out")
    assert httpx.get(f"{base}/v1/videos?provider=openai").status_code == 200


def test_content_range_and_encoding_are_kept(proxy: str, upstream: Upstream) -> None:
    raw = gzip.compress(b"frame" * 1000)
    upstream.sim.state.faults.append(
        {
            "status": 206,
            "body": raw,
            "headers": {"content-encoding": "gzip", "content-type": "video/mp4"},
        }
    )
    with httpx.stream(
        "GET", f"{proxy}/v1/videos/v:openai/content", headers={"Range": "bytes=0-99"}
    ) as r:
        sent = b"".join(r.iter_raw())
    assert r.status_code == 206 and sent == raw  # no double decompression
    assert r.headers["content-encoding"] == "gzip" and r.headers["content-length"] == str(len(raw))
    assert upstream.sim.state.requests[-1].header("range") == "bytes=0-99"


def test_passthrough_streams_server_sent_events(upstream: Upstream, make_proxy: Any) -> None:
    """Each event reaches the client before the upstream produces the next one."""
    first_seen = threading.Event()

    async def events(request: Any) -> StreamingResponse:
        async def gen() -> Any:
            import anyio

            yield b"data: one\n\n"
            await anyio.to_thread.run_sync(first_seen.wait, 10)
            yield b"data: two\n\n"

        assert request.url.query == "stream=1"
        return StreamingResponse(gen(), media_type="text/event-stream")

    sse = Starlette(routes=[Route("/v1/chat/completions", events, methods=["POST"])])
    with serve_in_thread(sse, lifespan="off") as server:
        base = make_proxy(upstream_url=server.url)
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions?stream=1", json={"stream": True}
        ) as r:
            lines = r.iter_lines()
            assert next(lines) == "data: one"
            first_seen.set()
            rest = [line for line in lines if line]
        assert r.headers["content-type"].startswith("text/event-stream")
        assert rest == ["data: two"]


def test_passthrough_forwards_method_query_body(proxy: str, upstream: Upstream) -> None:
    r = httpx.post(f"{proxy}/v1/chat/completions?x=1", content=b'{"a":1}', headers=ALICE)
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no route POST")
    seen = upstream.sim.state.requests[-1]
    assert (seen.method, seen.raw_path, seen.query, seen.body) == (
        "POST",
        "/v1/chat/completions",
        "x=1",
        b'{"a":1}',
    )


def test_content_download_stops_when_client_hangs_up(make_proxy: Any, upstream: Upstream) -> None:
    upstream.sim.state.config.content_bytes = 512 * 1024 * 1024
    base = make_proxy()
    vid = create(base)["id"]
    upstream.clock.advance(100)
    with httpx.stream("GET", f"{base}/v1/videos/{vid}/content", headers=ALICE) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    # The proxy keeps serving; the aborted download did not pin the pool.
    for _ in range(3):
        assert httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE).status_code == 200


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/chat/completions"])
def test_stalled_request_body_is_408(make_proxy: Any, upstream: Upstream, path: str) -> None:
    import socket

    base = make_proxy(client_body_timeout_seconds=0.3)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"prompt"'
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"client_body_timeout_seconds" in data
    assert upstream.sim.state.requests == []  # nothing complete ever reached the upstream
    assert httpx.get(f"{base}/healthz").status_code == 200


def test_query_strings_are_forwarded_on_every_video_route(proxy: str, upstream: Upstream) -> None:
    vid = create(proxy)["id"]
    httpx.post(
        f"{proxy}/v1/videos?trace=1", json={"model": "openai/sora-2", "prompt": "x"}, headers=ALICE
    )
    assert upstream.sim.state.requests[-1].query == "trace=1"
    r = httpx.get(f"{proxy}/v1/videos/{vid}?trace=2", headers=ALICE)
    assert r.status_code == 200 and upstream.sim.state.requests[-1].query == "trace=2"
    # A retrieve with a query never shares an entry with a plain one.
    assert httpx.get(f"{proxy}/v1/videos/{vid}", headers=ALICE).headers["x-cache-status"] == "MISS"
    httpx.post(f"{proxy}/v1/videos/{vid}/remix?trace=3", json={"prompt": "y"}, headers=ALICE)
    assert upstream.sim.state.requests[-1].query == "trace=3"
    httpx.delete(f"{proxy}/v1/videos/{vid}?trace=4", headers=ALICE)
    assert upstream.sim.state.requests[-1].query == "trace=4"


def test_readyz_is_503_once_sigterm_arrives(make_proxy: Any) -> None:
    """The app flags draining on SIGTERM and chains to the server's own handler."""
    base = make_proxy()
    app = base.app
    assert httpx.get(f"{base}/readyz").status_code == 200
    chained: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: chained.append(signum))
    try:
        app.watch_sigterm()  # what lifespan startup does in the server's main thread
        signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, original)
    assert chained == [signal.SIGTERM]
    assert_envelope(httpx.get(f"{base}/readyz"), 503, "draining")
    assert httpx.get(f"{base}/healthz").status_code == 200

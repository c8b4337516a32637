"""The upstream edge as a security boundary: one test per defect of the hostile-client /
hostile-upstream review, each over real sockets (raw ones where framing matters)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.chaos import JOB, STRAY, Chaos, chaos_upstream
from tests.conftest import Upstream
from tests.rawhttp import closed_by_peer, connect, exchange, read_response
from tests.servers import run_proxy, wait_until
from tests.test_proxy_core import create

VIDEO = "/v1/videos/video_1:openai"


@pytest.fixture
def chaos() -> Iterator[Chaos]:
    with chaos_upstream() as upstream:
        yield upstream


def assert_raw_envelope(r: Any, status: int, fragment: str) -> None:
    assert r.status == status, r.body
    body = json.loads(r.body)
    assert body["status_code"] == status and fragment in body["error"]["message"], body


# -- 1. framing headers describe exactly the body sent ----------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/videos/smug1:openai"),
        ("GET", "/v1/videos"),
        ("GET", "/openai/v1/videos/smug1:openai/content"),
        ("DELETE", "/v1/videos/smug1:openai"),
    ],
)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_on_a_bodiless_video_route_is_refused(
    make_proxy: Any, chaos: Chaos, method: str, path: str, framing: str
) -> None:
    base = make_proxy(upstream_url=chaos.url)
    body = b"z" * 1500
    if framing == "length":
        framed = b"Content-Length: 1500\r\n\r\n" + body
    else:
        framed = b"Transfer-Encoding: chunked\r\n\r\n5dc\r\n" + body + b"\r\n0\r\n\r\n"
    with connect(base) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: p\r\n".encode() + framed)
        assert_raw_envelope(read_response(sock), 400, "must not have a body")
        # The client connection stays in step: the next request on it is answered.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert read_response(sock).status == 200
    assert chaos.requests == 0


def test_smuggling_repro_never_reaches_the_management_api(make_proxy: Any, chaos: Chaos) -> None:
    """The issue's reproduction: a GET with a body, then a carrier on pass-through."""
    base = make_proxy(upstream_url=chaos.url)
    smuggled = b"GET /api/governance/virtual-keys HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n"
    carrier = b"\r\n" * 2000 + smuggled
    r = httpx.request("GET", base + "/v1/videos/smug1:openai", content=b"z" * 1500)
    assert r.status_code == 400
    # A cached retrieve first, so a GET with a body would also be tried on the hit path.
    assert httpx.get(base + VIDEO).status_code == 200
    assert httpx.get(base + VIDEO).headers["x-cache-status"] == "HIT"
    r = httpx.request("GET", base + VIDEO, content=b"z" * 1500)
    assert r.status_code == 400
    r = httpx.post(base + "/v1/chat/completions", content=carrier)
    assert r.status_code == 200
    assert [(s.method, s.target) for s in chaos.seen] == [
        ("GET", VIDEO),
        ("POST", "/v1/chat/completions"),
    ]
    assert chaos.seen[1].body == carrier
    assert chaos.seen[1].header(b"content-length") == str(len(carrier)).encode()


def test_create_framing_is_built_for_the_body_sent(make_proxy: Any, chaos: Chaos) -> None:
    base = make_proxy(upstream_url=chaos.url)
    body = b'{"model":"openai/sora-2","prompt":"a cat"}'
    with connect(base) as sock:  # a client that lies about nothing, but says Expect
        sock.sendall(
            b"POST /v1/videos HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        data = bytearray()
        response = read_response(sock, data)
        if response.status == 100:
            response = read_response(sock, data)
        assert response.status == 200
    (seen,) = chaos.seen
    assert seen.body == body and seen.header(b"content-length") == str(len(body)).encode()
    assert seen.header(b"expect") is None and seen.header(b"transfer-encoding") is None


# -- 2. a pooled connection that received stray bytes is never reused -------------------------


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
@pytest.mark.parametrize("mode", ["stray_later", "stray_same_write"])
def test_stray_answer_on_a_pooled_connection_is_never_served(
    make_proxy: Any, chaos: Chaos, client: str, mode: str
) -> None:
    base = make_proxy(upstream_url=chaos.url, upstream_client=client)
    chaos.mode = mode
    r = httpx.get(base + "/v1/videos/tenant_a_job:openai", headers={"Authorization": "Bearer a"})
    assert r.status_code == 200 and r.content == b"{}"
    chaos.release_stray.set()
    assert chaos.stray_sent.wait(5)
    if client == "aiohttp":  # until the stray answer sits parsed on the idle connection
        connector = base.app.upstream._session.connector
        wait_until(
            lambda: (
                any(p._buffer or p._tail for q in connector._conns.values() for p, _ in q)
                or not connector._conns
            ),
            what="stray bytes received",
        )
    other = {"Authorization": "Bearer b"}
    for _ in range(2):  # a HIT the second time would mean the stray answer was cached
        r = httpx.get(base + VIDEO, headers=other)
        assert r.status_code == 200 and r.json()["id"] == json.loads(JOB)["id"], r.content
        assert b"victim_job" not in r.content and r.content != STRAY
    assert chaos.connections == 2  # the polluted connection was dropped, a new one made


# -- 3. empty segments never bypass video routing ----------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1//videos/NOT-AN-ID",
        "/openai//v1/videos/NOT-AN-ID",
        "/openai/v1//videos/NOT-AN-ID",
        "/v1/%2Fvideos/NOT-AN-ID",
        "/v1/videos//NOT-AN-ID",
        "//v1/videos/NOT-AN-ID",
    ],
)
def test_empty_segments_never_pass_a_video_route_through(
    proxy: str, upstream: Upstream, path: str
) -> None:
    r = exchange(proxy, f"GET {path} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    assert r.status in (400, 404) and json.loads(r.body)["status_code"] == r.status
    assert upstream.calls == 0


# -- 4. request-header size limit --------------------------------------------------------------


def test_oversized_headers_get_431_before_being_read(upstream: Upstream, tmp_path: Any) -> None:
    with run_proxy(upstream.url, tmp_path=tmp_path) as proc:
        fits = b"x" * 60_000
        r = exchange(proc.url, b"GET /healthz HTTP/1.1\r\nHost: p\r\nX-Big: " + fits + b"\r\n\r\n")
        assert r.status == 200
        r = exchange(
            proc.url,
            b"GET " + VIDEO.encode() + b" HTTP/1.1\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n",
        )
        assert_raw_envelope(r, 431, "max_header_bytes")
        # 32 MiB of one header: refused and closed long before the client is done sending.
        with connect(proc.url) as sock:
            sock.sendall(b"GET " + VIDEO.encode() + b" HTTP/1.1\r\nX-Big: ")
            sent, answer = 0, b""
            with pytest.raises(OSError):  # EPIPE / reset: the proxy stopped reading
                while sent < 32 * 1024 * 1024:
                    sock.sendall(b"y" * 65536)
                    sent += 65536
            answer = sock.recv(65536) if sent else b""
        assert sent < 32 * 1024 * 1024
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
        assert httpx.get(proc.url + "/healthz").status_code == 200
    assert upstream.calls == 0


# -- 5. a client hang-up stops the upstream download -------------------------------------------


def test_hang_ups_stop_the_upstream_download(chaos: Chaos, tmp_path: Any) -> None:
    chaos.mode = "big_download"  # 64 MiB each
    downloads = 10
    with run_proxy(chaos.url, tmp_path=tmp_path) as proc:  # the default (aiohttp) client
        for i in range(downloads):
            with connect(proc.url) as sock:
                sock.sendall(b"GET /v1/videos/v%d:openai/content HTTP/1.1\r\nHost: p\r\n\r\n" % i)
                received = 0
                while received < 1024 * 1024:
                    received += len(sock.recv(65536))
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            wait_until(lambda: chaos.open_connections == 0, timeout=1.5, what="upstream closed")
    # Socket buffers hold a few MiB each way; the other ~56 MiB must never be sent.
    assert chaos.sent_bytes < downloads * 16 * 1024 * 1024, chaos.sent_bytes


# -- 6. trailer fields never become request headers --------------------------------------------


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/chat/completions"])
def test_trailers_of_a_chunked_body_are_not_forwarded(
    make_proxy: Any, chaos: Chaos, path: str
) -> None:
    base = make_proxy(upstream_url=chaos.url)
    body = b'{"model":"openai/sora-2","prompt":"a cat"}'
    r = exchange(
        base,
        f"POST {path} HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n".encode()
        + b"Transfer-Encoding: chunked\r\nTrailer: X-Trailer-Injected\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\nX-Trailer-Injected: yes\r\n\r\n",
    )
    assert r.status == 200
    (seen,) = chaos.seen
    assert seen.body == body
    assert seen.header(b"x-trailer-injected") is None and b"yes" not in seen.head


# -- 7 and 8. WebSocket upgrades and credentials in logs at debug level ------------------------


def test_websocket_upgrade_is_plain_http_and_no_credential_is_logged(
    upstream: Upstream, tmp_path: Any
) -> None:
    secret = "sk-bf-LEAKME"
    with run_proxy(upstream.url, "--log-level", "debug", tmp_path=tmp_path) as proc:
        upgrade = (
            f"GET /v1/videos/ws1:openai HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {secret}\r\n\r\n"
        ).encode()
        with connect(proc.url) as sock:
            sock.sendall(upgrade)
            r = read_response(sock)
            assert r.status == 404 and r.header(b"upgrade") is None  # the job is unknown
            assert closed_by_peer(sock)  # not kept for another request
        headers = {"Authorization": f"Bearer {secret}", "x-api-key": secret, "x-bf-vk": secret}
        video = create(proc.url, headers=headers)["id"]
        assert httpx.get(f"{proc.url}/v1/videos/{video}", headers=headers).status_code == 200
        httpx.post(f"{proc.url}/v1/chat/completions?key={secret}", headers=headers, json={})
        httpx.get(f"{proc.url}/v1/videos/bad", headers=headers)
        wait_until(lambda: "/v1/chat/completions" in proc.log() or "passthrough" in proc.log())
    log = proc.log()
    assert "DEBUG" in log.upper() or '"level": "debug"' in log  # debug logging was on
    assert secret not in log and "LEAKME" not in log


def test_a_websocket_scope_is_refused_not_500(make_proxy: Any, upstream: Upstream) -> None:
    """Under a server with WebSockets on (not the console script's), the handshake is
    refused cleanly (403), never a 500."""
    from proxy.app import create_app
    from tests.conftest import make_settings
    from tests.servers import serve_in_thread

    with serve_in_thread(create_app(make_settings(upstream.url))) as server:
        r = exchange(
            server.url,
            b"GET /v1/videos/ws1:openai HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
    assert r.status == 403
    assert upstream.calls == 0


# -- 9. an upstream status outside 200-599 -----------------------------------------------------


@pytest.mark.parametrize("path", [VIDEO, VIDEO + "/content", "/v1/chat/completions"])
def test_an_invalid_upstream_status_is_a_502_envelope(
    make_proxy: Any, chaos: Chaos, path: str
) -> None:
    base = make_proxy(upstream_url=chaos.url)
    chaos.mode = "bad_status"
    r = httpx.get(base + path)
    assert r.status_code == 502 and "invalid status" in r.json()["error"]["message"]
    chaos.mode = "normal"
    assert httpx.get(base + path).status_code == 200  # not cached, and served after


# -- 10. header bytes reach the upstream unchanged, or are refused -----------------------------


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_header_values_reach_the_upstream_byte_identical(
    make_proxy: Any, chaos: Chaos, client: str
) -> None:
    base = make_proxy(upstream_url=chaos.url, upstream_client=client)
    r = exchange(
        base, b"GET " + VIDEO.encode() + b" HTTP/1.1\r\nHost: p\r\nX-Obs: caf\xc3\xa9\r\n\r\n"
    )
    assert r.status == 200
    assert chaos.seen[0].header(b"x-obs") == b"caf\xc3\xa9"
    r = exchange(base, b"GET /v1/videos/v2:openai HTTP/1.1\r\nHost: p\r\nX-Obs: caf\xe9\r\n\r\n")
    assert_raw_envelope(r, 400, "'x-obs'")
    assert chaos.requests == 1


# -- 11. a disabled admin surface is a missing one ---------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/admin/cache", "/admin/cache/videos/a:openai"])
def test_admin_without_token_is_404_for_every_method(proxy: str, method: str, path: str) -> None:
    r = httpx.request(method, proxy + path)
    missing = httpx.request(method, proxy + "/admin/nothing")
    assert (r.status_code, r.json()["error"]) == (404, missing.json()["error"])


def test_admin_with_token_allows_only_delete(make_proxy: Any) -> None:
    base = make_proxy(admin_token="adm")
    r = httpx.get(base + "/admin/cache", headers={"Authorization": "Bearer adm"})
    assert r.status_code == 405


# -- 12. idle keep-alive -----------------------------------------------------------------------


def test_idle_client_connections_live_past_uvicorns_five_seconds(
    upstream: Upstream, tmp_path: Any
) -> None:
    with run_proxy(upstream.url, tmp_path=tmp_path) as proc, connect(proc.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert read_response(sock).status == 200
        sock.settimeout(6.0)  # idle past uvicorn's default of 5 s
        assert not closed_by_peer(sock)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert read_response(sock).status == 200


def test_keepalive_timeout_setting_closes_idle_connections(
    upstream: Upstream, tmp_path: Any
) -> None:
    env = {"PROXY_KEEPALIVE_TIMEOUT_SECONDS": "1"}
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as proc, connect(proc.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert read_response(sock).status == 200
        sock.settimeout(5.0)
        assert closed_by_peer(sock)

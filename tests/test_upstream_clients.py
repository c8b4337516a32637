"""Both clients under the upstream seam (aiohttp, the default, and httpx) behave alike."""

from __future__ import annotations

import gzip
from typing import Any

import httpx
import pytest

from proxy.simulator.app import expected_content
from tests.conftest import Upstream
from tests.servers import free_port
from tests.test_proxy_core import ALICE, assert_envelope, create


@pytest.fixture(params=["aiohttp", "httpx"])
def client_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_routes_and_bytes(make_proxy: Any, upstream: Upstream, client_name: str) -> None:
    base = make_proxy(upstream_client=client_name)
    vid = create(base, model="gemini/veo-3")["id"]
    assert httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE).json()["id"] == vid
    upstream.clock.advance(31)
    native = vid.rpartition(":")[0].replace("%2F", "/")
    r = httpx.get(f"{base}/v1/videos/{vid}/content?variant=thumbnail", headers=ALICE)
    assert r.content == expected_content(
        native, "thumbnail", upstream.sim.state.config.content_bytes
    )
    raw = gzip.compress(b"x" * 4000)
    upstream.sim.state.faults.append(
        {"status": 200, "body": raw, "headers": {"content-encoding": "gzip"}}
    )
    with httpx.stream("GET", f"{base}/v1/videos/{vid}/content", headers=ALICE) as r:
        assert b"".join(r.iter_raw()) == raw and r.headers["content-encoding"] == "gzip"
    r = httpx.post(f"{base}/v1/chat/completions?stream=0", content=b'{"a":1}', headers=ALICE)
    seen = upstream.sim.state.requests[-1]
    assert (r.status_code, seen.body, seen.query) == (404, b'{"a":1}', "stream=0")


def test_no_default_headers_added(make_proxy: Any, upstream: Upstream, client_name: str) -> None:
    base = make_proxy(upstream_client=client_name)
    with httpx.Client() as client:
        request = client.build_request("GET", f"{base}/v1/videos/v:openai/content")
        for name in ("accept-encoding", "user-agent", "accept"):
            del request.headers[name]
        client.send(request)
    seen = upstream.sim.state.requests[-1]
    assert seen.header("accept-encoding") is None and seen.header("user-agent") is None


def test_failures(make_proxy: Any, upstream: Upstream, client_name: str) -> None:
    dead = make_proxy(upstream_client=client_name, upstream_url=f"http://127.0.0.1:{free_port()}")
    assert_envelope(httpx.get(f"{dead}/v1/videos/v:openai"), 502, "could not connect")
    assert_envelope(httpx.get(f"{dead}/v1/videos/v:openai/content"), 502, "could not connect")
    slow = make_proxy(
        upstream_client=client_name, upstream_timeout_seconds=0.3, content_timeout_seconds=0.3
    )
    upstream.sim.state.faults.append({"delay": 2})
    assert_envelope(httpx.get(f"{slow}/v1/videos/v:openai"), 504, "timed out")
    upstream.sim.state.faults.append({"delay": 2})
    assert_envelope(httpx.get(f"{slow}/v1/videos/v:openai/content"), 504, "timed out")
    small = make_proxy(upstream_client=client_name, max_request_bytes=100)

    def chunks() -> Any:
        yield from [b"y" * 60] * 3

    assert_envelope(
        httpx.post(f"{small}/v1/chat/completions", content=chunks()), 413, "max_request_bytes"
    )

"""The proxy as a Starlette application: built by create_app, served by any ASGI server,
mountable inside another Starlette app."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from proxy.app import create_app
from tests.conftest import Upstream, make_settings
from tests.servers import free_port, serve_in_thread, wait_until
from tests.test_openai_sdk import sdk


def test_create_app_is_a_starlette_app_with_a_readable_routes_table() -> None:
    app = create_app(make_settings("http://bifrost.test"))
    assert isinstance(app, Starlette)
    paths = [route.path for route in app.routes if isinstance(route, Route)]
    for family in ("/v1/videos", "/openai/v1/videos"):
        for suffix in ("", "/{video_id}", "/{video_id}/remix", "/{video_id}/content"):
            assert family + suffix in paths
    assert {"/healthz", "/readyz", "/metrics", "/admin/cache", "/v1/{rest:path}"} <= set(paths)


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_mounted_under_a_prefix_with_the_openai_sdk(upstream: Upstream, prefix: str) -> None:
    proxy = create_app(make_settings(upstream.url))
    outer = Starlette(
        routes=[Mount("/bifrost", app=proxy)],
        lifespan=lambda app: proxy.router.lifespan_context(proxy),
    )
    with serve_in_thread(outer) as server:
        client = sdk(server.url + "/bifrost", prefix)
        video = client.videos.create(model="gemini/veo-3", prompt="a cat")
        assert video.id.endswith(":gemini") and "%2F" in video.id
        assert client.videos.retrieve(video.id).id == video.id
        assert [
            v.id for v in client.videos.list(extra_headers={"x-bf-video-list-provider": "gemini"})
        ] == [video.id]
        upstream.clock.advance(31)
        assert client.videos.download_content(video.id).content
        r = httpx.get(server.url + "/bifrost/v1/videos/not-an-id:")
        assert r.status_code == 400 and r.json()["error"]["param"] == "video_id"
        assert httpx.get(server.url + "/bifrost/api/config").status_code == 404
    # The upstream saw its own paths: never the mount prefix.
    assert upstream.sim.state.paths
    assert all(p.startswith(("/v1/videos", "/openai/v1/videos")) for p in upstream.sim.state.paths)


def test_uvicorn_factory_serves_the_same_proxy(upstream: Upstream, tmp_path: Any) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PROXY_UPSTREAM_URL"] = upstream.url
    log = open(tmp_path / "uvicorn.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "proxy.app:create_app", "--factory",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                return httpx.get(base + "/healthz", timeout=0.5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=20, what="uvicorn --factory start")
        client = sdk(base, "/v1")
        video = client.videos.create(model="openai/sora-2", prompt="a cat")
        assert client.videos.retrieve(video.id).status == "queued"
        r = httpx.get(
            f"{base}/v1/videos/{video.id}", headers={"authorization": "Bearer sk-bf-alice"}
        )
        assert r.headers["x-cache-status"] in ("MISS", "COALESCED")
        assert httpx.get(base + "/v1//videos/x").status_code == 404
    finally:
        process.terminate()
        # Plain uvicorn re-raises SIGTERM after its graceful shutdown (the console
        # script makes that exit 0); either way it stopped by itself, in time.
        assert process.wait(10) in (0, -15)
        log.close()

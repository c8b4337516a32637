"""The official OpenAI Python SDK, unchanged, through the proxy on both route families."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai import OpenAI

from proxy.simulator.app import expected_content
from tests.conftest import ProxyURL, Upstream
from tests.servers import free_port

FAMILIES = ["/v1", "/openai/v1"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


def sdk(base: str, prefix: str, key: str = "sk-bf-alice") -> OpenAI:
    return OpenAI(base_url=f"{base}{prefix}", api_key=key, max_retries=0, timeout=20)


@pytest.mark.parametrize("prefix", FAMILIES)
def test_create_retrieve_list_delete(proxy: ProxyURL, upstream: Upstream, prefix: str) -> None:
    client = sdk(proxy, prefix)
    video = client.videos.create(
        model="gemini/veo-3.1-fast-generate-001", prompt="a cat", seconds="8", size="1280x720"
    )
    assert video.id.endswith(":gemini") and video.status == "queued"
    assert video.id.startswith("models%2Fveo-3.1-fast-generate-001%2Foperations%2F")
    sent = upstream.sim.state.requests[-1]
    if prefix == "/v1":  # converted: Bifrost's native create takes JSON only
        assert sent.header("content-type") == "application/json"
        assert orjson.loads(sent.body) == {
            "model": "gemini/veo-3.1-fast-generate-001",
            "prompt": "a cat",
            "seconds": "8",
            "size": "1280x720",
        }
    else:  # the OpenAI-format family takes multipart itself: forwarded unchanged
        assert sent.header(
            "content-type",
        ).startswith("multipart/form-data")
    assert client.videos.retrieve(video.id).id == video.id  # the SDK double-encodes %2F
    # The OpenAI-format family's list takes its provider from a header.
    listed = client.videos.list(extra_headers={"x-bf-video-list-provider": "gemini"})
    assert [v.id for v in listed] == [video.id]
    deleted = client.videos.delete(video.id)
    assert deleted.id == video.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


@pytest.mark.parametrize("prefix", FAMILIES)
def test_create_with_input_reference(proxy: ProxyURL, upstream: Upstream, prefix: str) -> None:
    client = sdk(proxy, prefix)
    video = client.videos.create(
        model="openai/sora-2", prompt="like this", input_reference=("ref.png", PNG, "image/png")
    )
    assert video.status == "queued"
    if prefix == "/v1":
        body = orjson.loads(upstream.sim.state.requests[-1].body)
        head, _, data = body["input_reference"].partition(",")
        assert head == "data:image/png;base64" and base64.b64decode(data) == PNG


@pytest.mark.parametrize("prefix", FAMILIES)
def test_list_auto_paginates_over_after_cursors(proxy: ProxyURL, prefix: str) -> None:
    client = sdk(proxy, prefix)
    model = "gemini/veo-3.1-fast-generate-001"
    made = [client.videos.create(model=model, prompt=f"n{i}").id for i in range(5)]
    pages = client.videos.list(limit=2, extra_headers={"x-bf-video-list-provider": "gemini"})
    listed = [v.id for v in pages]
    assert listed == list(reversed(made))


@pytest.mark.parametrize("prefix", FAMILIES)
def test_remix_download_and_write_to_file(
    proxy: ProxyURL, upstream: Upstream, prefix: str, tmp_path: Path
) -> None:
    client = sdk(proxy, prefix)
    video = client.videos.create(model="openai/sora-2", prompt="a cat")
    upstream.clock.advance(31)
    remix = client.videos.remix(video.id, prompt="a dog")
    assert remix.remixed_from_video_id == video.id and remix.id != video.id
    native = video.id.rpartition(":")[0]
    size = upstream.sim.state.config.content_bytes
    for variant in ("video", "thumbnail", "spritesheet"):
        content = client.videos.download_content(video.id, variant=variant)
        assert content.content == expected_content(native, variant, size)
    target = tmp_path / "v.mp4"
    client.videos.download_content(video.id).write_to_file(target)
    assert target.read_bytes() == expected_content(native, "video", size)


@pytest.mark.parametrize("prefix", FAMILIES)
def test_gemini_ids_double_encoded_by_the_sdk(
    proxy: ProxyURL, upstream: Upstream, prefix: str
) -> None:
    client = sdk(proxy, prefix)
    video = client.videos.create(model="gemini/veo-3", prompt="a cat")
    assert "%2F" in video.id and video.id.endswith(":gemini")
    assert client.videos.retrieve(video.id).id == video.id
    assert "%252F" in upstream.sim.state.paths[-1]  # the SDK's double encoding, kept as one segment
    upstream.clock.advance(31)
    native = video.id.rpartition(":")[0]
    assert client.videos.download_content(video.id).content == expected_content(
        native.replace("%2F", "/"), "video", upstream.sim.state.config.content_bytes
    )
    by_header = client.videos.list(extra_headers={"x-bf-video-list-provider": "gemini"})
    assert [v.id for v in by_header] == [video.id]


@pytest.mark.parametrize("prefix", FAMILIES)
def test_create_and_poll(make_proxy: Any, upstream: Upstream, prefix: str) -> None:
    config = upstream.sim.state.config
    config.clock, config.queued_seconds, config.in_progress_seconds = time.time, 0.2, 0.3
    # The proxy shares the (frozen) test clock: coalescing off, or it would never expire.
    client = sdk(make_proxy(poll_coalesce_seconds=0), prefix)
    video = client.videos.create_and_poll(
        model="openai/sora-2", prompt="a cat", poll_interval_ms=50
    )
    assert video.status == "completed" and video.expires_at


@pytest.mark.parametrize("prefix", FAMILIES)
def test_sdk_errors(proxy: ProxyURL, upstream: Upstream, make_proxy: Any, prefix: str) -> None:
    client = sdk(proxy, prefix)
    with pytest.raises(openai.BadRequestError) as bad:
        client.videos.retrieve("not-an-id:")
    assert "id:provider" in str(bad.value)
    assert upstream.calls == 0
    with pytest.raises(openai.BadRequestError) as bad:
        client.videos.retrieve("not-an-id")  # no ":": a route name, Bifrost's to refuse
    assert "id:provider" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_doesnotexist:openai")
    dead = sdk(make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}"), prefix)
    with pytest.raises(openai.InternalServerError) as outage:
        dead.videos.retrieve("video_1:openai")
    assert outage.value.status_code == 502 and "could not connect" in str(outage.value)
    with pytest.raises(openai.InternalServerError):
        dead.videos.create(model="openai/sora-2", prompt="x")


def test_native_list_provider_fill(make_proxy: Any, upstream: Upstream) -> None:
    client = sdk(make_proxy(list_default_provider="replicate"), "/v1")
    video = client.videos.create(model="replicate/minimax-video-01", prompt="a cat")
    assert [v.id for v in client.videos.list()] == [video.id]
    assert upstream.sim.state.requests[-1].query == "provider=replicate"
    off = sdk(make_proxy(list_default_provider=""), "/v1")
    with pytest.raises(openai.BadRequestError) as info:
        off.videos.list()
    assert "provider is required" in str(info.value)  # Bifrost's own 400, passed through


def test_multipart_limits_and_garbage(make_proxy: Any, upstream: Upstream) -> None:
    import httpx

    base = make_proxy(max_request_bytes=4096)
    files = {"input_reference": ("ref.png", PNG, "image/png")}
    r = httpx.post(f"{base}/v1/videos", data={"prompt": "x"}, files=files)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
    r = httpx.post(
        f"{base}/v1/videos",
        content=b"--x\r\nnonsense",
        headers={"content-type": "multipart/form-data"},
    )
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    assert upstream.calls == 0

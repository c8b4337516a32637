"""What real clients send reaches Bifrost as Bifrost expects it; odd upstream answers are
relayed as a cache must (issue: fidelity). Real sockets: the OpenAI SDK, the simulator,
and the raw chaos upstream."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.chaos import Chaos, chaos_upstream
from tests.conftest import ProxyURL, Upstream
from tests.test_openai_sdk import PNG, sdk
from tests.test_proxy_core import ALICE, assert_envelope, create

JSON = {"content-type": "application/json"}


# -- 1 and 2. the multipart -> JSON bridge gives fields their JSON types --------------------


def last_json(upstream: Upstream) -> dict[str, Any]:
    sent = upstream.sim.state.requests[-1]
    assert sent.header("content-type") == "application/json"
    return dict(orjson.loads(sent.body))


def test_sdk_extra_body_params_arrive_typed(proxy: ProxyURL, upstream: Upstream) -> None:
    client = sdk(proxy, "/v1")
    video = client.videos.create(
        model="openai/sora-2",
        prompt="a cat",
        seconds="8",
        extra_body={"seed": 42, "audio": True, "extra_params": {"style": "noir"}},
    )
    assert video.status == "queued"
    assert last_json(upstream) == {
        "model": "openai/sora-2",
        "prompt": "a cat",
        "seconds": "8",  # stays a string, as Bifrost declares it
        "seed": 42,
        "audio": True,
        "extra_params": {"style": "noir"},
    }


def test_form_fields_typed_by_hand(proxy: ProxyURL, upstream: Upstream) -> None:
    form = {
        "model": "openai/sora-2",
        "prompt": "x",
        "seed": "-7",
        "audio": "false",
        "extra_params": '{"steps": 30}',
        "fallbacks": '["runway/gen-4"]',
        "mood": "42",  # unknown: passes as a string
    }
    r = httpx.post(f"{proxy}/v1/videos", files={k: (None, v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    assert last_json(upstream) == {
        "model": "openai/sora-2",
        "prompt": "x",
        "seed": -7,
        "audio": False,
        "extra_params": {"steps": 30},
        "fallbacks": ["runway/gen-4"],
        "mood": "42",
    }


@pytest.mark.parametrize(
    "field, value",
    [("seed", "abc"), ("seed", "4.2"), ("audio", "maybe"), ("extra_params", "[1]")],
)
def test_unconvertible_fields_are_400_naming_the_field(
    proxy: ProxyURL, upstream: Upstream, field: str, value: str
) -> None:
    form = {"model": "openai/sora-2", "prompt": "x", field: value}
    r = httpx.post(f"{proxy}/v1/videos", files={k: (None, v) for k, v in form.items()})
    assert_envelope(r, 400, repr(field))
    assert r.json()["error"]["param"] == field
    assert upstream.calls == 0


def test_input_reference_image_url(proxy: ProxyURL, upstream: Upstream) -> None:
    """``input_reference: {image_url}`` as the OpenAI Node SDK sends it (the Python SDK
    3.x refuses a dict there before sending anything)."""
    url = "https://example.test/cat.png"
    form = {"model": "openai/sora-2", "prompt": "like this", "input_reference[image_url]": url}
    r = httpx.post(f"{proxy}/v1/videos", files={k: (None, v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    body = last_json(upstream)
    assert body["input_reference"] == url and "input_reference[image_url]" not in body


def test_file_and_image_url_together_are_refused(proxy: ProxyURL, upstream: Upstream) -> None:
    r = httpx.post(
        f"{proxy}/v1/videos",
        data={"model": "openai/sora-2", "prompt": "x", "input_reference[image_url]": "data:x"},
        files={"input_reference": ("ref.png", PNG, "image/png")},
    )
    assert_envelope(r, 400, "not both")
    assert upstream.calls == 0
    r = httpx.post(  # a file alone still becomes a data URL
        f"{proxy}/v1/videos",
        data={"model": "openai/sora-2", "prompt": "x"},
        files={"input_reference": ("ref.png", PNG, "image/png")},
    )
    assert r.status_code == 200
    head, _, data = last_json(upstream)["input_reference"].partition(",")
    assert head == "data:image/png;base64" and base64.b64decode(data) == PNG


# -- 3. CORS preflight reaches the upstream --------------------------------------------------


@pytest.fixture
def chaos() -> Iterator[Chaos]:
    with chaos_upstream() as upstream:
        yield upstream


@pytest.mark.parametrize(
    "path",
    [
        "/v1/videos",
        "/v1/videos/video_1:openai",
        "/openai/v1/videos/NOT-AN-ID/content",
        "/v1/chat/completions",
    ],
)
def test_cors_preflight_is_relayed(make_proxy: Any, chaos: Chaos, path: str) -> None:
    base = make_proxy(upstream_url=chaos.url)
    chaos.extra_headers = (
        b"Access-Control-Allow-Origin: https://app.test\r\n"
        b"Access-Control-Allow-Methods: GET, POST, DELETE\r\n"
        b"Access-Control-Allow-Headers: authorization, content-type\r\n"
        b"Access-Control-Max-Age: 600\r\n"
    )
    r = httpx.options(
        base + path,
        headers={
            "Origin": "https://app.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.test"
    assert r.headers["access-control-allow-methods"] == "GET, POST, DELETE"
    assert r.headers["access-control-max-age"] == "600"
    (seen,) = chaos.seen
    assert (seen.method, seen.target) == ("OPTIONS", path)
    assert seen.header(b"origin") == b"https://app.test"
    assert seen.header(b"access-control-request-method") == b"POST"


# -- 4, 5 and 6. upstream answers a shared cache must not reuse ------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"cache-control": "no-store"},
        {"cache-control": "private"},
        {"cache-control": "max-age=60, no-cache"},
        {"set-cookie": "session=tenant-a; HttpOnly"},
    ],
)
def test_answers_that_forbid_reuse_never_hit(
    proxy: ProxyURL, upstream: Upstream, headers: dict[str, str]
) -> None:
    video = create(proxy)["id"]
    done = {"id": video, "object": "video", "status": "completed", "progress": 100}
    done["expires_at"] = int(upstream.clock()) + 3600  # normally cached until then
    calls = upstream.calls
    for _ in range(3):
        upstream.sim.state.faults.append(
            {"status": 200, "body": orjson.dumps(done), "headers": {**JSON, **headers}}
        )
        r = httpx.get(f"{proxy}/v1/videos/{video}", headers=ALICE)
        assert r.status_code == 200 and r.headers["x-cache-status"] == "MISS"
    assert upstream.calls == calls + 3  # every poll went upstream: nothing was stored


@pytest.mark.parametrize("status", [["completed"], {"state": "completed"}, 7])
def test_odd_status_answers_are_relayed_verbatim_uncached(
    proxy: ProxyURL, upstream: Upstream, status: Any
) -> None:
    from proxy import metrics

    odd = orjson.dumps({"id": "video_odd", "object": "video", "status": status})
    before = sum(s.value for m in metrics.TRANSITIONS.collect() for s in m.samples)
    for _ in range(2):
        upstream.sim.state.faults.append({"status": 200, "body": odd, "headers": JSON})
        r = httpx.get(f"{proxy}/v1/videos/video_odd:openai")
        assert (r.status_code, r.content, r.headers["x-cache-status"]) == (200, odd, "MISS")
    after = sum(s.value for m in metrics.TRANSITIONS.collect() for s in m.samples)
    assert after == before  # no status transition counted

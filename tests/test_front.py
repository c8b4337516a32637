"""The front dispatch (issue 22): plain retrieve misses answered without Starlette's
layers, byte for byte as the routed path answers them. ``Content-Length: 0`` sends the
same request through the router (the fast paths never take a request with framing
headers), so each pair below is one request answered both ways."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Upstream
from tests.servers import free_port
from tests.test_proxy_core import ALICE, BOB, create

ROUTED = {"Content-Length": "0"}


def both_ways(base: Any, path: str, headers: dict[str, str]) -> tuple[httpx.Response, ...]:
    front = base.app.front
    before = front.answered
    fast = httpx.get(base + path, headers=headers)
    assert front.answered == before + 1, "not answered by the front dispatch"
    routed = httpx.get(base + path, headers={**headers, **ROUTED})
    assert front.answered == before + 1
    return fast, routed


def same(fast: httpx.Response, routed: httpx.Response) -> None:
    assert fast.status_code == routed.status_code
    assert fast.content == routed.content
    drop = {"x-request-id", "date", "content-length", "age"}
    assert [(k, v) for k, v in fast.headers.items() if k not in drop] == [
        (k, v) for k, v in routed.headers.items() if k not in drop
    ]


@pytest.mark.parametrize(
    "case", ["running", "unknown", "bad id", "foreign", "encoded colon", "gemini"]
)
def test_a_plain_miss_is_answered_as_the_routed_path_answers_it(
    make_proxy: Any, upstream: Upstream, case: str
) -> None:
    upstream.sim.state.config.shared_account = True
    url = make_proxy(poll_coalesce_seconds=0)  # every poll a miss
    vid = create(url)["id"]
    gemini = create(url, model="gemini/veo-3.1-fast-generate-001")["id"]
    path, headers = {
        "running": (f"/v1/videos/{vid}", ALICE),
        "unknown": ("/v1/videos/video_0123456789abcdef01234567:openai", ALICE),
        "bad id": ("/v1/videos/:openai", ALICE),
        "foreign": (f"/v1/videos/{vid}", BOB),
        "encoded colon": (f"/openai/v1/videos/{vid.replace(':', '%3A')}", ALICE),
        "gemini": (f"/v1/videos/{gemini}", ALICE),
    }[case]
    fast, routed = both_ways(url, path, headers)
    if case in ("running", "encoded colon", "gemini"):
        for r in (fast, routed):
            assert r.status_code == 200 and r.headers["x-cache-status"] == "MISS"
        assert fast.json()["id"] == routed.json()["id"]
        return
    same(fast, routed)


def test_an_unreachable_upstream_is_the_same_502(make_proxy: Any) -> None:
    url = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    fast, routed = both_ways(url, "/v1/videos/video_1:openai", ALICE)
    assert fast.status_code == 502
    same(fast, routed)

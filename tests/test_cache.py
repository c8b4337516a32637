"""The cache end to end: the proxy (memory backend) in front of the simulator."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ProxyURL, Upstream
from tests.test_proxy_core import ALICE, BOB, create

JSON = {"content-type": "application/json"}


def finish(
    base: str,
    upstream: Upstream,
    model: str = "openai/sora-2",
    headers: dict[str, str] = ALICE,
    prompt: str = "a cat",
) -> dict[str, Any]:
    job = create(base, model=model, headers=headers, prompt=prompt)
    upstream.clock.advance(31)
    return job


def get(base: str, vid: str, headers: dict[str, str] = ALICE, family: str = "") -> httpx.Response:
    return httpx.get(f"{base}{family}/v1/videos/{vid}", headers=headers)


def test_terminal_answers_hit_until_expires_at(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    miss = get(proxy, vid)
    assert miss.headers["x-cache-status"] == "MISS" and miss.json()["status"] == "completed"
    expires_at = miss.json()["expires_at"]
    calls = upstream.calls
    for _ in range(5):
        hit = get(proxy, vid)
        assert hit.headers["x-cache-status"] == "HIT" and hit.headers["age"] == "0"
    assert upstream.calls == calls
    upstream.clock.now = expires_at - 0.01
    hit = get(proxy, vid)
    assert hit.headers["x-cache-status"] == "HIT" and int(hit.headers["age"]) > 3000
    upstream.clock.now = expires_at  # never served at expires_at
    assert get(proxy, vid).headers["x-cache-status"] == "MISS"
    # The upstream still answers the (now past) expires_at: not stored again.
    assert get(proxy, vid).headers["x-cache-status"] == "MISS"
    assert upstream.calls == calls + 2


def test_hit_body_is_the_upstream_body_plus_cache_debug(
    proxy: ProxyURL, upstream: Upstream
) -> None:
    vid = finish(proxy, upstream)["id"]
    miss = get(proxy, vid).json()
    hit = get(proxy, vid).json()
    debug = hit["extra_fields"].pop("cache_debug")
    assert set(debug) == {"cache_hit", "hit_type", "cache_id"} and debug["cache_hit"] is True
    assert hit == miss
    assert get(proxy, vid).json()["extra_fields"]["cache_debug"]["cache_id"] == debug["cache_id"]


@pytest.mark.parametrize(
    "model, prompt",
    [("gemini/veo-3", "a cat"), ("runway/gen-4", "a cat"), ("openai/sora-2", "please fail")],
)
def test_terminal_without_expires_at_uses_terminal_ttl(
    make_proxy: Any, upstream: Upstream, model: str, prompt: str
) -> None:
    base = make_proxy(terminal_ttl_seconds=100)
    vid = finish(base, upstream, model=model, prompt=prompt)["id"]
    first = get(base, vid)
    assert "expires_at" not in first.json() and first.json()["status"] in ("completed", "failed")
    assert first.headers["x-cache-status"] == "MISS"
    upstream.clock.advance(99.9)
    assert get(base, vid).headers["x-cache-status"] == "HIT"
    upstream.clock.advance(0.1)
    assert get(base, vid).headers["x-cache-status"] == "MISS"


def test_max_ttl_caps_every_entry(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(max_ttl_seconds=10)
    vid = finish(base, upstream)["id"]
    assert get(base, vid).headers["x-cache-status"] == "MISS"
    upstream.clock.advance(9.9)
    assert get(base, vid).headers["x-cache-status"] == "HIT"
    upstream.clock.advance(0.1)
    assert get(base, vid).headers["x-cache-status"] == "MISS"


def test_running_jobs_are_coalesced_for_the_window(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=2)
    vid = create(base)["id"]
    assert get(base, vid).headers["x-cache-status"] == "MISS"
    upstream.clock.advance(1.9)
    r = get(base, vid)
    assert (r.headers["x-cache-status"], r.headers["age"]) == ("COALESCED", "1")
    upstream.clock.advance(0.1)
    assert get(base, vid).headers["x-cache-status"] == "MISS"


def test_coalescing_off(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0)
    vid = create(base)["id"]
    assert [get(base, vid).headers["x-cache-status"] for _ in range(3)] == ["MISS"] * 3
    assert upstream.calls == 4


def test_bypass_refreshes_and_no_store_does_not_store(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    assert (
        get(proxy, vid, {**ALICE, "Cache-Control": "no-store"}).headers["x-cache-status"]
        == "BYPASS"
    )
    assert get(proxy, vid).headers["x-cache-status"] == "MISS"  # no-store stored nothing
    before = get(proxy, vid).json()["extra_fields"]["cache_debug"]["cache_id"]
    r = get(proxy, vid, {**ALICE, "Cache-Control": "no-cache"})
    assert r.headers["x-cache-status"] == "BYPASS" and "cache_debug" not in r.json()["extra_fields"]
    after = get(proxy, vid).json()["extra_fields"]["cache_debug"]["cache_id"]
    assert after != before  # the entry was refreshed


def test_tenants_never_share_entries(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    assert get(proxy, vid).headers["x-cache-status"] == "MISS"
    assert get(proxy, vid).headers["x-cache-status"] == "HIT"
    for other in (BOB, {}, {"x-api-key": "sk-alice"}, {**ALICE, "x-bf-eh-org": "other"}):
        r = get(proxy, vid, other)
        assert r.status_code == 404 and r.headers["x-cache-status"] == "MISS", other
        assert vid not in r.text or r.json()["error"]


def test_errors_are_never_cached(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    for status, body in [
        (500, b"boom"),
        (429, b'{"status":"completed"}'),
        (200, b"not json"),
        (200, b'{"status":"completed"'),
    ]:
        upstream.sim.state.faults.append({"status": status, "body": body, "headers": JSON})
        r = get(proxy, vid)
        assert (r.status_code, r.content, r.headers["x-cache-status"]) == (status, body, "MISS")
    assert get(proxy, vid).headers["x-cache-status"] == "MISS"
    assert get(proxy, vid).headers["x-cache-status"] == "HIT"


def test_large_answers_pass_unstored(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(cache_max_entry_bytes=2000)
    big = orjson.dumps({"id": "v:openai", "status": "completed", "prompt": "x" * 5000})
    for _ in range(2):
        upstream.sim.state.faults.append({"status": 200, "body": big, "headers": JSON})
        r = get(base, "v:openai")
        assert r.content == big and r.headers["x-cache-status"] == "MISS"


def test_delete_invalidates_every_tenant_and_family(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    for family in ("", "/openai"):
        get(proxy, vid, family=family)
        assert get(proxy, vid, family=family).headers["x-cache-status"] == "HIT"
    assert proxy.app.hot  # both families memoised for the fast path
    r = httpx.delete(f"{proxy}/v1/videos/{vid}", headers=ALICE)
    assert r.status_code == 200
    assert not proxy.app.hot  # the memo let go with the store: nothing kept alive
    for family in ("", "/openai"):
        r = get(proxy, vid, family=family)
        assert (r.status_code, r.headers["x-cache-status"]) == (404, "MISS")


def test_failed_delete_keeps_the_entry(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    get(proxy, vid)
    assert httpx.delete(f"{proxy}/v1/videos/{vid}", headers=BOB).status_code == 404
    assert get(proxy, vid).headers["x-cache-status"] == "HIT"


def test_eviction_under_the_byte_bound(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(cache_max_bytes=8000)
    ids = [create(base)["id"] for _ in range(20)]
    upstream.clock.advance(31)
    for vid in ids:
        assert get(base, vid).headers["x-cache-status"] == "MISS"
    entries, size = base.app.cache.stats()  # type: ignore[union-attr]
    assert 0 < entries < 20 and size <= 8000
    assert base.app.cache.evictions >= 20 - entries  # type: ignore[union-attr]
    assert get(base, ids[-1]).headers["x-cache-status"] == "HIT"  # most recent kept
    assert get(base, ids[0]).headers["x-cache-status"] == "MISS"  # least recent evicted


def test_concurrent_misses_make_one_upstream_call(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    calls = upstream.calls
    upstream.sim.state.faults.append({"delay": 0.5})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            headers=ALICE, limits=httpx.Limits(max_connections=100)
        ) as client:
            return await asyncio.gather(
                *(client.get(f"{proxy}/v1/videos/{vid}") for _ in range(50))
            )

    answers = asyncio.run(burst())
    assert upstream.calls == calls + 1
    assert {r.status_code for r in answers} == {200}
    statuses = sorted(r.headers["x-cache-status"] for r in answers)
    assert statuses.count("MISS") == 1 and set(statuses) <= {"MISS", "COALESCED", "HIT"}


def test_shared_call_survives_a_waiter_hanging_up(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = finish(proxy, upstream)["id"]
    calls = upstream.calls
    upstream.sim.state.faults.append({"delay": 0.6})

    async def scenario() -> httpx.Response:
        async with (
            httpx.AsyncClient(headers=ALICE) as impatient,
            httpx.AsyncClient(headers=ALICE) as patient,
        ):
            first = asyncio.create_task(impatient.get(f"{proxy}/v1/videos/{vid}", timeout=0.2))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(patient.get(f"{proxy}/v1/videos/{vid}", timeout=5))
            with pytest.raises(httpx.TimeoutException):
                await first
            return await second

    answer = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.json()["status"] == "completed"
    assert upstream.calls == calls + 1
    assert get(proxy, vid).headers["x-cache-status"] == "HIT"


def test_admin_purge(make_proxy: Any, upstream: Upstream, proxy: ProxyURL) -> None:
    assert httpx.delete(f"{proxy}/admin/cache").status_code == 404  # disabled by default
    base = make_proxy(admin_token="s3cret-admin")
    vid = finish(base, upstream)["id"]
    get(base, vid)
    assert get(base, vid).headers["x-cache-status"] == "HIT"
    r = httpx.delete(f"{base}/admin/cache/videos/{vid}", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "s3cret" not in r.text
    assert get(base, vid).headers["x-cache-status"] == "HIT"
    r = httpx.delete(
        f"{base}/admin/cache/videos/{vid}", headers={"Authorization": "Bearer s3cret-admin"}
    )
    assert r.json() == {"purged": 1, "content_purged": 0}  # no video was downloaded
    assert get(base, vid).headers["x-cache-status"] == "MISS"
    r = httpx.delete(f"{base}/admin/cache", headers={"Authorization": "Bearer s3cret-admin"})
    assert r.json() == {"purged": 1, "content_purged": 0}
    assert get(base, vid).headers["x-cache-status"] == "MISS"


def test_repeated_hits_keep_every_guarantee(proxy: ProxyURL, upstream: Upstream) -> None:
    """Hits after the first take the memoised fast path; it must behave the same."""
    vid = finish(proxy, upstream)["id"]
    get(proxy, vid)
    first = get(proxy, vid)
    assert proxy.app.hot  # memoised
    for i in range(3):
        r = get(proxy, vid, {**ALICE, "X-Request-ID": f"rid-{i}"})
        assert (r.headers["x-cache-status"], r.headers["x-request-id"]) == ("HIT", f"rid-{i}")
        assert r.content == first.content and r.headers["content-length"] == str(len(first.content))
    assert (
        get(proxy, vid, {**ALICE, "Cache-Control": "no-cache"}).headers["x-cache-status"]
        == "BYPASS"
    )
    assert get(proxy, vid, BOB).status_code == 404  # other credentials never match the memo
    upstream.clock.advance(4000)  # past expires_at
    assert get(proxy, vid).headers["x-cache-status"] == "MISS"


def test_fifty_mib_json_answer_passes_unstored(proxy: ProxyURL, upstream: Upstream) -> None:
    big = orjson.dumps(
        {
            "id": "v:openai",
            "object": "video",
            "status": "completed",
            "prompt": "x" * (50 * 1024 * 1024),
        }
    )
    for _ in range(2):
        upstream.sim.state.faults.append({"status": 200, "body": big, "headers": JSON})
        r = get(proxy, "v:openai")
        assert (
            r.status_code == 200
            and len(r.content) == len(big)
            and r.headers["x-cache-status"] == "MISS"
        )
    assert proxy.app.cache.stats() == (0, 0)  # type: ignore[union-attr]

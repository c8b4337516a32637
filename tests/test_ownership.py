"""Job ownership: behind one provider account (the simulator's ``shared_account``, where
every credential sees every job, as one account behind Bifrost does), only the tenant
that created a job through the proxy may address it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.conftest import ProxyURL, Upstream
from tests.redis_server import redis_server
from tests.servers import run_proxy, run_replicas
from tests.test_proxy_core import ALICE, BOB
from tests.test_redis_cache import redis_env

FAMILIES = ["/v1/videos", "/openai/v1/videos"]


@pytest.fixture
def shared(upstream: Upstream) -> Upstream:
    upstream.sim.state.config.shared_account = True
    return upstream


def create(base: str, headers: dict[str, str] = ALICE, path: str = "/v1/videos") -> str:
    r = httpx.post(base + path, json={"model": "openai/sora-2", "prompt": "a cat"}, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def created_elsewhere(upstream: Upstream) -> str:
    """A job made without the proxy (before it was deployed, or by another client)."""
    r = httpx.post(upstream.url + "/v1/videos", json={"model": "openai/sora-2", "prompt": "x"})
    return str(r.json()["id"])


def addressed_since(upstream: Upstream, since: int, vid: str) -> bool:
    """Whether any upstream request since ``since`` named the job (decoys do not)."""
    return any(vid.split(":")[0] in p for p in upstream.sim.state.paths[since:])


def denied(route: str) -> float:
    name = "bifrost_proxy_ownership_denied_total"
    return REGISTRY.get_sample_value(name, {"route": route}) or 0.0


def every_route(
    base: str, path: str, vid: str, headers: dict[str, str]
) -> dict[str, httpx.Response]:
    url = f"{base}{path}/{vid}"
    return {
        "retrieve": httpx.get(url, headers=headers),
        "long-poll": httpx.get(url, headers={**headers, "Prefer": "wait=5"}),
        "no-cache": httpx.get(url, headers={**headers, "Cache-Control": "no-cache"}),
        "events": httpx.get(url + "/events", headers=headers),
        "content": httpx.get(url + "/content", headers=headers),
        "remix": httpx.post(url + "/remix", json={"prompt": "blue"}, headers=headers),
        "delete": httpx.delete(url, headers=headers),
    }


@pytest.mark.parametrize("path", FAMILIES)
def test_another_tenant_gets_the_unknown_job_404_on_every_route(
    proxy: ProxyURL, shared: Upstream, path: str
) -> None:
    vid = create(proxy, path=path)
    shared.clock.advance(31)  # completed: a terminal answer, cached for Alice
    assert httpx.get(f"{proxy}{path}/{vid}", headers=ALICE).json()["status"] == "completed"
    unknown_id = vid.replace("video_", "video_0")
    unknown = every_route(proxy, path, unknown_id, BOB)  # the upstream's own answers
    before, sent_before = denied(path + "/{video_id}"), len(shared.sim.state.paths)
    answers = every_route(proxy, path, vid, BOB)
    # Only decoys went upstream (one per route): the job itself was never addressed.
    sent = shared.sim.state.paths[sent_before:]
    assert len(sent) == 7 and not any(vid.split(":")[0] in p for p in sent), sent
    for route, r in answers.items():
        assert r.status_code == unknown[route].status_code == 404, route
        assert r.text == unknown[route].text.replace(unknown_id, vid), route
        assert set(r.headers) == set(unknown[route].headers), route
        assert r.headers.get("x-cache-status") == unknown[route].headers.get("x-cache-status")
    assert denied(path + "/{video_id}") == before + 4  # retrieve (3 ways) and delete
    # The owner still reaches all of it, and the job was never deleted.
    mine = every_route(proxy, path, vid, ALICE)
    assert {route: r.status_code for route, r in mine.items()} == dict.fromkeys(mine, 200)


def test_the_creator_of_a_remix_owns_it(proxy: ProxyURL, shared: Upstream) -> None:
    source = create(proxy)
    remix = httpx.post(f"{proxy}/v1/videos/{source}/remix", json={"prompt": "b"}, headers=ALICE)
    new = remix.json()["id"]
    assert httpx.get(f"{proxy}/v1/videos/{new}", headers=ALICE).status_code == 200
    assert httpx.get(f"{proxy}/v1/videos/{new}", headers=BOB).status_code == 404


@pytest.mark.parametrize("path", FAMILIES)
def test_lists_drop_other_tenants_jobs(proxy: ProxyURL, shared: Upstream, path: str) -> None:
    alice = {create(proxy, ALICE, path) for _ in range(2)}
    bob = create(proxy, BOB, path)
    elsewhere = created_elsewhere(shared)
    everything = httpx.get(shared.url + path + "?provider=openai").json()
    assert len(everything["data"]) == 4  # the upstream shows every job to everyone

    def listed(headers: dict[str, str], query: str = "") -> dict[str, Any]:
        if path == "/v1/videos":  # the native list's provider (the default is gemini)
            query = "?provider=openai" + query.replace("?", "&")
        r = httpx.get(f"{proxy}{path}{query}", headers=headers)
        assert r.status_code == 200
        return dict(r.json())

    before = denied(path)
    assert {j["id"] for j in listed(ALICE)["data"]} == alice | {elsewhere}
    seen_by_bob = listed(BOB)
    assert {j["id"] for j in seen_by_bob["data"]} == {bob, elsewhere}
    assert seen_by_bob["first_id"] in {bob, elsewhere} and seen_by_bob["has_more"] is False
    assert seen_by_bob["last_id"] == seen_by_bob["data"][-1]["id"]
    assert denied(path) == before + 3
    # Paging stays possible when a page's last job is someone else's.
    page = listed(BOB, "?limit=1&order=asc")  # the oldest job: Alice's
    assert page["data"] == [] and page["has_more"] is True and page["first_id"] is None
    assert page["last_id"] not in (None, bob)
    rest = listed(BOB, f"?limit=10&order=asc&after={page['last_id']}")
    assert {j["id"] for j in rest["data"]} == {bob, elsewhere}


def test_unknown_jobs_pass_unless_strict(make_proxy: Any, shared: Upstream) -> None:
    lenient = make_proxy()
    strict = make_proxy(job_ownership_strict=True)
    vid = created_elsewhere(shared)
    assert httpx.get(f"{lenient}/v1/videos/{vid}", headers=BOB).status_code == 200
    sent_before = len(shared.sim.state.paths)
    r = httpx.get(f"{strict}/v1/videos/{vid}", headers=BOB)
    assert r.status_code == 404
    assert not any(vid.split(":")[0] in p for p in shared.sim.state.paths[sent_before:])
    listed = httpx.get(f"{strict}/v1/videos", headers=BOB).json()
    assert vid not in {j["id"] for j in listed["data"]}
    own = create(strict, BOB)
    assert httpx.get(f"{strict}/v1/videos/{own}", headers=BOB).status_code == 200


def test_enforcement_off_is_the_upstreams_view(make_proxy: Any, shared: Upstream) -> None:
    base = make_proxy(enforce_job_ownership=False)
    vid = create(base)
    assert httpx.get(f"{base}/v1/videos/{vid}", headers=BOB).status_code == 200


def test_the_ownership_header_separates_end_users(make_proxy: Any, shared: Upstream) -> None:
    base = make_proxy(ownership_header="x-end-user-id")
    ann = {**ALICE, "x-end-user-id": "ann"}
    ben = {**ALICE, "x-end-user-id": "ben"}
    vid = create(base, ann)
    shared.clock.advance(31)
    url = f"{base}/v1/videos/{vid}"
    assert httpx.get(url, headers=ann).headers["x-cache-status"] == "MISS"
    assert httpx.get(url, headers=ann).headers["x-cache-status"] == "HIT"
    assert httpx.get(url, headers=ann).headers["x-cache-status"] == "HIT"  # the fast path
    assert httpx.get(url, headers=ben).status_code == 404  # same key, another end user
    assert httpx.get(url, headers=ALICE).status_code == 404  # no end user at all
    # Idempotency keys are per end user too.
    body = {"model": "openai/sora-2", "prompt": "a cat"}
    a = httpx.post(base + "/v1/videos", json=body, headers={**ann, "Idempotency-Key": "k"})
    b = httpx.post(base + "/v1/videos", json=body, headers={**ben, "Idempotency-Key": "k"})
    assert a.json()["id"] != b.json()["id"] and "idempotent-replayed" not in b.headers


def test_ownership_across_replicas_on_redis(shared: Upstream, tmp_path: Any) -> None:
    with redis_server() as redis, run_replicas(shared.url, redis_env(redis), tmp_path) as (a, b):
        vid = create(a.url)
        assert httpx.get(f"{b.url}/v1/videos/{vid}", headers=ALICE).status_code == 200
        sent = len(shared.sim.state.paths)
        assert httpx.get(f"{b.url}/v1/videos/{vid}", headers=BOB).status_code == 404
        assert httpx.delete(f"{a.url}/v1/videos/{vid}", headers=BOB).status_code == 404
        assert not addressed_since(shared, sent, vid)
        assert b"sk-bf-" not in redis.command("KEYS", "*")


def test_strict_mode_fails_closed_without_redis(shared: Upstream, tmp_path: Any) -> None:
    with redis_server() as redis:
        env = {**redis_env(redis), "PROXY_JOB_OWNERSHIP_STRICT": "true"}
        with run_replicas(shared.url, env, tmp_path) as (a, _):
            vid = create(a.url)
            redis.stop()
            r = httpx.get(f"{a.url}/v1/videos/{vid}", headers=ALICE, timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "ownership cannot be checked" in r.json()["error"]["message"]


def test_two_workers_on_memory_share_owners(shared: Upstream, tmp_path: Any) -> None:
    env = {"PROXY_LOG_LEVEL": "warning", "PROXY_JOB_OWNERSHIP_STRICT": "true"}
    with run_proxy(shared.url, "--workers", "2", env=env, tmp_path=tmp_path) as proc:
        vid = create(proc.url)
        sent = len(shared.sim.state.paths)
        for _ in range(12):  # fresh connections: both workers answer some
            assert httpx.get(f"{proc.url}/v1/videos/{vid}", headers=BOB).status_code == 404
        assert not addressed_since(shared, sent, vid)
        for _ in range(12):  # strict: the owner is known to every worker
            assert httpx.get(f"{proc.url}/v1/videos/{vid}", headers=ALICE).status_code == 200


def test_an_owners_polls_look_the_owner_up_once(make_proxy: Any, shared: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0)  # every poll a miss
    store = base.app.owners.store
    lookups: list[list[str]] = []
    original = store.get_records

    async def counted(names: list[str]) -> list[bytes | None]:
        lookups.append(names)
        return await original(names)

    store.get_records = counted  # type: ignore[method-assign]
    vid = create(base)
    for _ in range(5):
        assert httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE).status_code == 200
    assert len(lookups) == 1  # a job's owner never changes: confirmed once
    for _ in range(2):
        assert httpx.get(f"{base}/v1/videos/{vid}", headers=BOB).status_code == 404
    assert len(lookups) == 3  # refusals are never memoised

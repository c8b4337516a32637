"""Idempotency-Key on creates and remixes (IETF httpapi draft, Stripe's semantics), over
real sockets: the in-thread proxy, the console script, two replicas on a real Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from proxy.cache.base import Entry
from proxy.cache.memory import MemoryStore
from proxy.hoststate import HostRecords
from proxy.idempotency import Idempotency
from proxy.policy import EntryKind
from tests.conftest import ProxyURL, Upstream
from tests.redis_server import redis_server
from tests.servers import run_proxy, run_replicas, wait_until
from tests.test_proxy_core import ALICE, BOB, assert_envelope
from tests.test_redis_cache import redis_env

FAMILIES = ["/v1/videos", "/openai/v1/videos"]


def creates(upstream: Upstream) -> int:
    return sum(1 for r in upstream.sim.state.requests if r.method == "POST")


def post(
    base: str, key: str | None, path: str = "/v1/videos", prompt: str = "a cat", **headers: str
) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return httpx.post(
        base + path,
        json={"model": "openai/sora-2", "prompt": prompt},
        headers={**ALICE, **extra, **headers},
        timeout=30,
    )


def replays() -> float:
    return REGISTRY.get_sample_value("bifrost_proxy_idempotent_replays_total") or 0.0


@pytest.mark.parametrize("path", FAMILIES)
def test_a_retry_replays_the_first_answer(proxy: ProxyURL, upstream: Upstream, path: str) -> None:
    before = replays()
    first = post(proxy, "order-1", path)
    again = post(proxy, "order-1", path)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.json()["id"].endswith(":openai")
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["content-type"] == first.headers["content-type"]
    assert creates(upstream) == 1
    assert replays() == before + 1
    # The key reaches the upstream unchanged.
    assert upstream.sim.state.requests[-1].header("idempotency-key") == "order-1"


def test_json_spacing_and_key_order_are_the_same_request(
    proxy: ProxyURL, upstream: Upstream
) -> None:
    headers = {**ALICE, "Idempotency-Key": "k", "content-type": "application/json"}
    a = httpx.post(
        proxy + "/v1/videos", content=b'{"prompt":"a","model":"openai/sora-2"}', headers=headers
    )
    b = httpx.post(
        proxy + "/v1/videos",
        content=b'{ "model": "openai/sora-2",\n "prompt": "a" }',
        headers=headers,
    )
    assert a.json()["id"] == b.json()["id"] and creates(upstream) == 1


def test_the_same_key_with_another_body_is_422(proxy: ProxyURL, upstream: Upstream) -> None:
    assert post(proxy, "k1").status_code == 200
    r = post(proxy, "k1", prompt="a dog")
    assert_envelope(r, 422, "Idempotency-Key reused with a different request body")
    assert r.json()["error"]["param"] == "Idempotency-Key"
    # ...and on another route (the remix of some job) it is another request too.
    r = post(proxy, "k1", path="/openai/v1/videos")
    assert r.status_code == 422
    assert creates(upstream) == 1


def test_keys_are_per_tenant(proxy: ProxyURL, upstream: Upstream) -> None:
    alice = post(proxy, "shared-key")
    bob = post(proxy, "shared-key", **BOB)
    assert alice.status_code == bob.status_code == 200
    assert alice.json()["id"] != bob.json()["id"]
    assert "idempotent-replayed" not in bob.headers
    assert creates(upstream) == 2


def test_without_a_key_every_create_is_new(proxy: ProxyURL, upstream: Upstream) -> None:
    ids = {post(proxy, None).json()["id"] for _ in range(3)}
    assert len(ids) == 3 and creates(upstream) == 3


@pytest.mark.parametrize(
    "key", ["x" * 256, "caf\u00e9", "tab\there", ""], ids=["256 chars", "non-ascii", "tab", "empty"]
)
def test_malformed_keys_are_400_before_any_call(
    proxy: ProxyURL, upstream: Upstream, key: str
) -> None:
    r = httpx.post(
        proxy + "/v1/videos",
        json={"model": "openai/sora-2", "prompt": "a cat"},
        headers=[("authorization", "Bearer sk-bf-alice"), ("idempotency-key", key.encode())],
    )
    assert_envelope(r, 400, "Idempotency-Key must be 1 to 255 printable ASCII characters")
    assert upstream.calls == 0


def test_a_key_of_255_characters_is_fine(proxy: ProxyURL, upstream: Upstream) -> None:
    assert post(proxy, "k" * 255).status_code == 200


def test_two_keys_in_one_request_are_400(proxy: ProxyURL, upstream: Upstream) -> None:
    r = httpx.post(
        proxy + "/v1/videos",
        json={"prompt": "a"},
        headers=[("idempotency-key", b"a"), ("idempotency-key", b"b")],
    )
    assert_envelope(r, 400, "Idempotency-Key given more than once")
    assert upstream.calls == 0


def test_ten_concurrent_duplicates_make_one_upstream_create(
    proxy: ProxyURL, upstream: Upstream
) -> None:
    upstream.sim.state.faults.append({"delay": 1.0})  # the create is slow
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(proxy, "burst"), range(10)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 9
    assert creates(upstream) == 1


@pytest.mark.parametrize("status", [500, 503, 429, 400])
def test_failures_are_not_remembered(proxy: ProxyURL, upstream: Upstream, status: int) -> None:
    upstream.sim.state.faults.append(
        {
            "status": status,
            "body": b'{"error":{"message":"x"}}',
            "headers": {"content-type": "application/json"},
        }
    )
    assert post(proxy, "retry-me").status_code == status
    retry = post(proxy, "retry-me")
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert creates(upstream) == 2
    assert post(proxy, "retry-me").headers["idempotent-replayed"] == "true"
    assert creates(upstream) == 2


def test_an_upstream_timeout_keeps_the_key_as_outcome_unknown(
    make_proxy: Any, upstream: Upstream
) -> None:
    """The create timed out at the proxy but went on upstream (it is billed): a retry
    with the same key must not create a second video (issue 20, defect 7)."""
    base = make_proxy(upstream_timeout_seconds=0.3)
    upstream.sim.state.faults.append({"delay": 1.0})
    assert post(base, "slow").status_code == 504
    retry = post(base, "slow")
    assert_envelope(retry, 409, "outcome of an earlier request")
    wait_until(lambda: len(upstream.sim.state.jobs) == 1, what="the slow create to land")
    assert post(base, "slow").status_code == 409
    assert creates(upstream) == 1
    assert post(base, "another key").status_code == 200  # other keys are unaffected


def test_an_unreachable_upstream_is_not_remembered(upstream: Upstream, tmp_path: Any) -> None:
    """No connection: nothing was sent, so the retry may create."""
    from tests.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with run_proxy(dead, tmp_path=tmp_path) as proc:
        assert post(proc.url, "nowhere").status_code == 502
        assert post(proc.url, "nowhere").status_code == 502  # not 409: never sent


@pytest.mark.parametrize("path", FAMILIES)
def test_remix_is_idempotent(proxy: ProxyURL, upstream: Upstream, path: str) -> None:
    source = post(proxy, None, path).json()["id"]
    remix = f"{proxy}{path}/{source}/remix"
    headers = {**ALICE, "Idempotency-Key": "remix-1"}
    first = httpx.post(remix, json={"prompt": "now in blue"}, headers=headers)
    again = httpx.post(remix, json={"prompt": "now in blue"}, headers=headers)
    assert first.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert creates(upstream) == 2  # the source and one remix
    other = httpx.post(remix, json={"prompt": "now in red"}, headers=headers)
    assert other.status_code == 422


def test_the_openai_sdk_retry_after_a_timeout_bills_once(
    proxy: ProxyURL, upstream: Upstream
) -> None:
    """The SDK times out, retries with the same key, and joins the create in flight."""
    upstream.sim.state.faults.append({"delay": 1.5})
    client = openai.OpenAI(
        base_url=proxy + "/openai/v1", api_key="sk-bf-alice", timeout=0.5, max_retries=3
    )
    video = client.videos.create(
        model="sora-2", prompt="a cat", extra_headers={"Idempotency-Key": "sdk-1"}
    )
    assert video.id.endswith(":openai")
    assert creates(upstream) == 1
    again = client.videos.create(
        model="sora-2", prompt="a cat", extra_headers={"Idempotency-Key": "sdk-1"}
    )
    assert again.id == video.id and creates(upstream) == 1


def test_two_replicas_on_redis_replay_and_wait_for_each_other(
    upstream: Upstream, tmp_path: Any
) -> None:
    with redis_server() as redis, run_replicas(upstream.url, redis_env(redis), tmp_path) as (a, b):
        first = post(a.url, "across")
        again = post(b.url, "across")
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        assert creates(upstream) == 1
        # Concurrent duplicates on both replicas while the first create is slow.
        upstream.sim.state.faults.append({"delay": 1.0})
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda i: post((a, b)[i % 2].url, "burst"), range(10)))
        assert len({r.json()["id"] for r in answers}) == 1
        assert creates(upstream) == 2
        assert post(b.url, "burst", prompt="other").status_code == 422
        # Keys and bodies are never stored in plain text.
        dump = redis.command("KEYS", "*")
        assert b"burst" not in dump and b"across" not in dump and b"sk-bf-alice" not in dump


# -- the memory store: each kind has its own budget; idempotency records are never evicted --
def test_idempotency_records_are_refused_not_evicted_past_their_budget() -> None:
    import asyncio

    from proxy.cache.base import RecordsFull

    async def scenario() -> None:
        store = MemoryStore(2_000_000, time.time, idempotency_max_bytes=200_000, tenant_share=0.5)
        now = time.time()
        terminal = Entry("v:openai", EntryKind.TERMINAL, 200, [], b"x" * 1000, now, now + 3600)
        await store.put("native|v:openai|victim", terminal)
        await store.put_record("own:v:openai", b"f" * 32, 3600)
        idem = Idempotency(86400, 30, b"secret")
        victim = idem.record_name("victim", "order-1")
        assert await store.put_record(victim, b"meta\n" + b"b" * 400, 86400, only_new=True)
        accepted = 0
        with pytest.raises(RecordsFull, match="share"):
            for i in range(100_000):
                name = idem.record_name("flood", f"key-{i}")
                assert await store.put_record(name, b"meta\n" + b"b" * 400, 86400, only_new=True)
                accepted += 1
        assert 150 < accepted < 200  # half of the budget, at ~525 bytes a record
        # A second flooding tenant fills the rest; then the store refuses, evicting nobody.
        with pytest.raises(RecordsFull, match="full"):
            for i in range(100_000):
                name = idem.record_name("flood-2", f"key-{i}")
                await store.put_record(name, b"meta\n" + b"b" * 400, 86400, only_new=True)
        _, size = store.record_stats()
        assert size <= 200_000 + 32_000  # idempotency budget plus the owner record
        assert (await store.get_records([victim]))[0] is not None  # never evicted
        first_flood = idem.record_name("flood", "key-0")
        assert (await store.get_records([first_flood]))[0] is not None
        # The answer that replaces a claim always fits (the create happened).
        assert await store.put_record(victim, b"meta\n" + b"a" * 900, 86400)
        assert store.get_nowait("native|v:openai|victim") is terminal
        assert await store.get_records(["own:v:openai"]) == [b"f" * 32]

    asyncio.run(scenario())


def test_a_tenant_that_floods_the_cache_evicts_its_own_answers_first() -> None:
    import asyncio

    async def scenario() -> None:
        store = MemoryStore(100_000, time.time)
        now = time.time()

        def entry(i: int) -> Entry:
            return Entry(f"v{i}:openai", EntryKind.TERMINAL, 200, [], b"x" * 2000, now, now + 3600)

        victims = [entry(i) for i in range(10)]
        for i, e in enumerate(victims):
            await store.put(f"native|v{i}:openai|victim", e)
        for i in range(10_000):
            await store.put(f"native|f{i}:openai|flood", entry(1000 + i))
        assert store.stats()[1] <= 100_000
        assert all(
            store.get_nowait(f"native|v{i}:openai|victim") is e for i, e in enumerate(victims)
        )
        shares = store.tenant_stats()
        assert shares["flood"] > shares["victim"]  # free room is still used by whoever needs it

    asyncio.run(scenario())


def test_purging_the_cache_keeps_records(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(admin_token="t0ken")
    first = post(base, "keep")
    purge = httpx.delete(base + "/admin/cache", headers={"authorization": "Bearer t0ken"})
    assert purge.status_code == 200
    assert post(base, "keep").json()["id"] == first.json()["id"]
    assert creates(upstream) == 1


def test_a_client_that_hangs_up_still_gets_one_create(proxy: ProxyURL, upstream: Upstream) -> None:
    """The first request's client leaves mid-create; its retry gets that very job."""
    upstream.sim.state.faults.append({"delay": 1.0})
    done = threading.Event()

    def impatient() -> None:
        try:
            httpx.post(
                proxy + "/v1/videos",
                json={"model": "openai/sora-2", "prompt": "a cat"},
                headers={**ALICE, "Idempotency-Key": "hangup"},
                timeout=0.2,
            )
        except httpx.TimeoutException:
            done.set()

    impatient()
    assert done.is_set()
    retry = post(proxy, "hangup")
    assert retry.status_code == 200 and creates(upstream) == 1


# -- several workers on the memory backend: records shared through the host ---------------
def test_two_workers_on_memory_share_keys(upstream: Upstream, tmp_path: Any) -> None:
    env = {"PROXY_LOG_LEVEL": "warning"}
    with run_proxy(upstream.url, "--workers", "2", env=env, tmp_path=tmp_path) as proc:
        ids = {post(proc.url, "one-key").json()["id"] for _ in range(12)}  # fresh connections
        assert len(ids) == 1 and creates(upstream) == 1
        upstream.sim.state.faults.append({"delay": 1.0})
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: post(proc.url, "burst"), range(10)))
        assert len({r.json()["id"] for r in answers}) == 1 and creates(upstream) == 2


def test_host_records_claim_once_across_processes(tmp_path: Any) -> None:
    import multiprocessing

    HostRecords(str(tmp_path), 1 << 20).close()
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        claimed = pool.map(_claim, [str(tmp_path)] * 8)
    assert sorted(claimed) == [False] * 7 + [True]


def _claim(directory: str) -> bool:
    import asyncio

    store = HostRecords(directory, 1 << 20)
    try:
        return asyncio.run(store.put_record("idem:t:x", b"pending", 30, only_new=True))
    finally:
        store.close()


def test_host_records_refuse_claims_past_the_budget_and_keep_owners(tmp_path: Any) -> None:
    import asyncio

    from proxy.cache.base import RecordsFull

    store = HostRecords(str(tmp_path), 200_000, tenant_share=0.5)

    async def fill() -> None:
        assert await store.put_record("own:v:openai", b"f" * 32, 3600)
        assert await store.put_record("idem:victim:1", b"b" * 100, 86400, only_new=True)
        with pytest.raises(RecordsFull, match="share"):
            for i in range(10_000):
                await store.put_record(f"idem:flood:{i}", b"b" * 100, 86400, only_new=True)
        assert await store.get_records(["own:v:openai", "idem:victim:1", "idem:flood:0"]) == [
            b"f" * 32,
            b"b" * 100,
            b"b" * 100,
        ]
        # An expired claim can be claimed again; a live one cannot.
        assert await store.put_record("idem:c:c", b"1", 0.05, only_new=True)
        assert not await store.put_record("idem:c:c", b"2", 30, only_new=True)
        await asyncio.sleep(0.1)
        assert await store.put_record("idem:c:c", b"3", 30, only_new=True)

    asyncio.run(fill())
    assert store.size() <= 200_000
    store.close()


def test_a_duplicate_gives_up_with_409_when_the_first_never_ends() -> None:
    """Another replica's pending record outlives the lease: 409, not a second create."""
    import asyncio

    from proxy.errors import ProxyError
    from proxy.idempotency import _dumps

    async def scenario() -> None:
        store = MemoryStore(1 << 20, time.time)
        idem = Idempotency(86400, lease=0.1, secret=b"s")
        idem.store = store
        name = idem.record_name("tenant", "k")
        await store.put_record(name, _dumps("same-hash", None), 30)  # held elsewhere
        calls: list[int] = []

        async def create() -> Any:
            calls.append(1)
            raise AssertionError("must not be called")

        with pytest.raises(ProxyError) as caught:
            await idem.run("tenant", "k", "same-hash", create)
        assert caught.value.status == 409 and calls == []

    asyncio.run(scenario())


def test_creates_are_served_while_redis_is_down(upstream: Upstream, tmp_path: Any) -> None:
    with redis_server() as redis, run_replicas(upstream.url, redis_env(redis), tmp_path) as (a, _):
        assert post(a.url, "before").status_code == 200
        redis.stop()
        r = post(a.url, "during")  # not deduplicated across replicas now, but served
        assert r.status_code == 200 and r.json()["id"].endswith(":openai")


def test_one_process_keeps_no_backlog_of_records(make_proxy: Any, upstream: Upstream) -> None:
    """On the memory backend the records are the store: nothing waits to be written."""
    base = make_proxy()
    for i in range(20):
        assert post(base, f"mem-{i}").status_code == 200
    assert len(base.app.idempotency.backlog) == 0
    assert post(base, "mem-3").headers["idempotent-replayed"] == "true"

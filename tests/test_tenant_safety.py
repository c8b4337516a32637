"""Issue 20: what one party (a hostile tenant, a broken webhook receiver, a crashing
replica, a Redis outage) could do to everyone else. One test per defect, over real
sockets, each failing on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from proxy.policy import cache_key, tenant_fingerprint
from tests.conftest import Upstream
from tests.redis_server import redis_server
from tests.servers import run_proxy, run_replicas, serve_in_thread, wait_until
from tests.test_idempotency import creates, post
from tests.test_proxy_core import ALICE, BOB, assert_envelope, create
from tests.test_redis_cache import redis_env
from tests.test_webhooks import SECRET, create_followed

MiB = 1024 * 1024


# -- 1. one tenant cannot wipe another's idempotency records ------------------------------
def test_a_flooding_tenant_cannot_make_a_victims_retry_bill_twice(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(cache_max_bytes=4 * MiB)
    assert post(base, "order-1").status_code == 200  # Alice, the victim
    # Bob makes one job whose answer is ~900 KB (the job echoes its prompt) ...
    r = httpx.post(
        f"{base}/v1/videos",
        json={"model": "openai/sora-2", "prompt": "x" * 900_000},
        headers=BOB,
        timeout=30,
    )
    bob_job = r.json()["id"]
    upstream.clock.advance(31)
    # ... and polls it with a new query string each time (Bifrost's retrieve takes none).
    for n in range(20):
        polled = httpx.get(f"{base}/v1/videos/{bob_job}?n={n}", headers=BOB, timeout=30)
        assert polled.status_code == 200 and polled.headers["x-cache-status"] == "MISS"
    assert base.app.cache.stats()[0] == 0  # no entry per query string
    retry = post(base, "order-1")
    assert retry.headers.get("idempotent-replayed") == "true"
    assert creates(upstream) == 2  # Alice's one and Bob's one


def test_a_full_idempotency_store_refuses_new_keys_with_503(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(idempotency_max_bytes=8_000, idempotency_tenant_share=0.5)
    for i in range(100):
        r = post(base, f"k-{i}", **BOB)
        if r.status_code == 503:
            break
        assert r.status_code == 200
    else:
        raise AssertionError("the store never filled")
    assert_envelope(r, 503, "share of idempotency records")
    assert r.headers["retry-after"] == "60" and r.json()["error"]["param"] == "Idempotency-Key"
    made = creates(upstream)
    assert post(base, "alice-1").status_code == 200  # another tenant still has its share
    assert post(base, "k-0", **BOB).headers["idempotent-replayed"] == "true"
    assert creates(upstream) == made + 1


# -- 2. a webhook receiver's answer is never read whole -----------------------------------
@dataclass
class HostileReceiver:
    """A raw-socket receiver answering every delivery 200, then 100 MiB or forever."""

    mode: str  # "huge" or "endless"
    url: str = ""
    deliveries: int = 0
    sent: int = 0
    closed_by_peer: threading.Event = field(default_factory=threading.Event)

    def handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.deliveries += 1
            chunk = b"\0" * MiB
            try:
                if self.mode == "huge":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * MiB))
                    for _ in range(100):
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                        self.sent += len(chunk)
            except OSError:
                self.closed_by_peer.set()


@pytest.fixture(params=["huge", "endless"])
def hostile_receiver(request: Any) -> Iterator[HostileReceiver]:
    receiver = HostileReceiver(request.param)
    server = socket.create_server(("127.0.0.1", 0))
    receiver.url = f"http://127.0.0.1:{server.getsockname()[1]}/hook"

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=receiver.handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield receiver
    server.close()


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_webhook_receivers_answer_costs_bounded_memory(
    upstream: Upstream, hostile_receiver: HostileReceiver, tmp_path: Any
) -> None:
    env = {
        "PROXY_WEBHOOK_URL": hostile_receiver.url, "PROXY_WEBHOOK_SECRET": SECRET,
        "PROXY_WEBHOOK_POLL_SECONDS": "0.05", "PROXY_WEBHOOK_TIMEOUT_SECONDS": "20",
        "PROXY_LOG_LEVEL": "warning",
    }  # fmt: skip
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as proc:
        create_followed(proc.url)
        before = peak_rss(proc.process.pid)
        upstream.clock.advance(31)
        wait_until(lambda: hostile_receiver.deliveries == 1, what="the delivery")
        # The status decided: the proxy closed the connection long before 100 MiB (or
        # the webhook timeout), and counted the delivery as delivered, once.
        assert hostile_receiver.closed_by_peer.wait(10), "the proxy kept reading"
        metrics = httpx.get(proc.url + "/metrics").text
        wait_until(
            lambda: 'outcome="delivered"} 1.0' in httpx.get(proc.url + "/metrics").text,
            what="a delivered outcome",
        )
        assert peak_rss(proc.process.pid) - before < 32 * MiB
        assert hostile_receiver.sent < 100 * MiB
    assert 'outcome="error"' not in metrics or 'outcome="error"} 0.0' in metrics


# -- 3 and 7. a waiter never creates; an unknown outcome stays unknown ---------------------
def test_a_replica_killed_mid_create_does_not_let_the_retry_create_again(
    upstream: Upstream, tmp_path: Any
) -> None:
    with redis_server() as redis:
        env = {**redis_env(redis), "PROXY_UPSTREAM_TIMEOUT_SECONDS": "1"}  # a 6 s hold
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            upstream.sim.state.faults.append({"delay": 3.0})  # the create is slow upstream
            pool = ThreadPoolExecutor(1)
            pool.submit(lambda: post(a.url, "crash-1"))
            wait_until(lambda: creates(upstream) == 1, what="the create to reach upstream")
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(10)
            retry = post(b.url, "crash-1")  # waits out the dead replica's hold, then 409
            assert_envelope(retry, 409, "outcome of an earlier request")
            assert_envelope(post(b.url, "crash-1"), 409, "outcome of an earlier request")
            pool.shutdown(wait=True)
            assert creates(upstream) == 1


# -- 4. Redis down: sequential retries are still deduplicated, owners recorded later ------
def test_while_redis_is_down_retries_are_deduplicated_and_owners_recorded_later(
    upstream: Upstream, tmp_path: Any
) -> None:
    upstream.sim.state.config.shared_account = True  # Bob could see Alice's job upstream
    with redis_server() as redis, run_replicas(upstream.url, redis_env(redis), tmp_path) as (a, b):
        redis.stop()
        first = post(a.url, "outage-1")
        assert first.status_code == 200
        again = post(a.url, "outage-1")
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json()["id"] == first.json()["id"] and creates(upstream) == 1
        vid = first.json()["id"]
        assert httpx.get(f"{a.url}/v1/videos/{vid}", headers=BOB).status_code == 404
        redis.start()  # empty: what the proxy held is written to it
        wait_until(
            lambda: b"own:" in redis.command("KEYS", "bvp:r:own:*"), what="the owner recorded"
        )
        wait_until(lambda: b"idem:" in redis.command("KEYS", "bvp:r:idem:*"), what="the answer")
        assert httpx.get(f"{b.url}/v1/videos/{vid}", headers=BOB).status_code == 404
        assert httpx.get(f"{b.url}/v1/videos/{vid}", headers=ALICE).status_code == 200
        from_b = post(b.url, "outage-1")
        assert from_b.headers.get("idempotent-replayed") == "true" and creates(upstream) == 1


# -- 5. no replica answers STALE for a job deleted through another -------------------------
def test_a_job_deleted_through_one_replica_is_never_stale_on_another(
    upstream: Upstream, tmp_path: Any
) -> None:
    with redis_server() as redis, run_replicas(upstream.url, redis_env(redis), tmp_path) as (a, b):
        vid = create(a.url)["id"]
        fresh = {**ALICE, "Cache-Control": "no-cache"}  # each replica asks upstream itself
        assert httpx.get(f"{a.url}/v1/videos/{vid}", headers=fresh).status_code == 200
        assert httpx.get(f"{b.url}/v1/videos/{vid}", headers=fresh).status_code == 200
        assert httpx.delete(f"{a.url}/v1/videos/{vid}", headers=ALICE).status_code == 200
        upstream.sim.state.faults.append({"status": 500, "body": b'{"error":"boom"}'})
        r = httpx.get(f"{b.url}/v1/videos/{vid}", headers=fresh)
        assert r.status_code == 500 and r.headers.get("x-cache-status") != "STALE"


# -- 6 and 9. waiting slots: SSE counts, per-tenant shares, slow readers, honest headers ---
async def _open_streams(
    url: str, path: str, count: int, results: list[tuple[int, int]], release: threading.Event
) -> None:
    """Open ``count`` SSE streams; report (still open, ended after one snapshot with
    ``retry:``), then keep the open ones until ``release``."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-bf-bob\r\n\r\n"
    open_streams: list[asyncio.StreamWriter] = []
    ended = 0

    async def one() -> None:
        nonlocal ended
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request.encode())
        data = b""
        try:
            async with asyncio.timeout(1.0):
                while not data.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
            if b"retry:" in data and b"data: " in data:
                ended += 1
            writer.close()
        except TimeoutError:
            assert b"data: " in data  # streaming: the first event came at once
            open_streams.append(writer)

    for start in range(0, count, 250):
        await asyncio.gather(*(one() for _ in range(min(250, count - start))))
    results.append((len(open_streams), ended))
    await asyncio.to_thread(release.wait, 60)
    for writer in open_streams:
        writer.close()


def test_sse_streams_respect_max_waiters_and_the_tenant_share(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05, max_waiters=200, max_waiters_per_tenant=50)
    bobs = create(base, headers=BOB)["id"]
    alices = create(base)["id"]
    results: list[tuple[int, int]] = []
    release = threading.Event()
    flood = threading.Thread(
        target=lambda: asyncio.run(
            _open_streams(base, f"/v1/videos/{bobs}/events", 2000, results, release)
        )
    )
    flood.start()
    wait_until(lambda: bool(results), timeout=120, what="2000 streams opened")
    still_open, ended = results[0]
    assert still_open == 50 and ended == 1950  # never more than the tenant's share
    assert base.app.watchers.waiters == 50
    # Alice still gets a real wait while Bob's streams are open.
    out: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: out.append(
            httpx.get(
                f"{base}/v1/videos/{alices}", headers={**ALICE, "Prefer": "wait=30"}, timeout=60
            )
        )
    )
    waiter.start()
    alice = base.app.owners.principal([(b"authorization", b"Bearer sk-bf-alice")])
    wait_until(lambda: alice in base.app.watchers.by_tenant, what="alice waits")
    upstream.clock.advance(31)
    waiter.join(30)
    assert out[0].json()["status"] == "completed"
    assert out[0].headers["preference-applied"] == "wait=30"
    release.set()
    flood.join(60)


def test_past_max_waiters_no_answer_claims_the_wait(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05, max_waiters=1)
    video = create(base)["id"]
    url = f"{base}/v1/videos/{video}"
    pool = ThreadPoolExecutor(1)
    first = pool.submit(lambda: httpx.get(url, headers={**ALICE, "Prefer": "wait=30"}, timeout=60))
    wait_until(lambda: base.app.watchers.waiters == 1)
    r = httpx.get(url, headers={**ALICE, "Prefer": "wait=30"})
    assert r.json()["status"] == "queued" and "preference-applied" not in r.headers
    missing = httpx.get(url.replace("video_", "video_0"), headers={**ALICE, "Prefer": "wait=5"})
    assert missing.status_code == 404 and "preference-applied" not in missing.headers
    upstream.clock.advance(31)
    assert first.result(30).headers["preference-applied"] == "wait=30"


def test_an_sse_reader_that_stops_reading_is_closed_after_the_send_timeout(
    upstream: Upstream,
) -> None:
    from proxy.app import create_app
    from tests.conftest import make_settings

    settings = make_settings(upstream.url, sse_keepalive_seconds=0.05, sse_send_timeout_seconds=0.3)
    app = create_app(settings, clock=upstream.clock)
    services = app.state.services
    video = httpx.post(
        upstream.url + "/v1/videos", json={"model": "openai/sora-2", "prompt": "a"}, headers=ALICE
    ).json()["id"]
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and len(messages) > 2:
            await asyncio.Event().wait()  # the client's buffers are full: blocked forever

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # never disconnects either
        raise AssertionError

    scope: Scope = {
        "type": "http", "method": "GET", "path": f"/v1/videos/{video}/events",
        "raw_path": f"/v1/videos/{video}/events".encode(), "query_string": b"",
        "headers": [(b"authorization", b"Bearer sk-bf-alice")], "scheme": "http",
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": "",
        "http_version": "1.1", "asgi": {"version": "3.0"},
    }  # fmt: skip

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            call: Any = app
            typed_receive: Receive = receive  # type: ignore[assignment]
            typed_send: Send = send  # type: ignore[assignment]
            async with asyncio.timeout(10):
                await call(scope, typed_receive, typed_send)
            assert services.watchers.waiters == 0  # the slot is free again

    asyncio.run(scenario())
    assert messages[0]["status"] == 200 and b"data: " in messages[1]["body"]
    assert not any(m.get("more_body") is False for m in messages)  # cut, not ended cleanly


# -- 8. another tenant's job answers exactly like an unknown job ---------------------------
class DistinctNotFound:
    """Around the simulator: its 404s replaced by a stand-in upstream's own 404 (another
    body, extra headers, 0.2 s late), as a real Bifrost's would differ from the proxy's."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held: list[dict[str, Any]] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 404:
                held.append(message)
                return
            if held:
                if not message.get("more_body"):
                    await asyncio.sleep(0.2)
                    path = scope["raw_path"].decode()
                    body = json.dumps(
                        {"error": {"message": f"stand-in: nothing at {path}", "code": "nf"},
                         "stand_in": True}
                    ).encode()  # fmt: skip
                    await send({"type": "http.response.start", "status": 404, "headers": [
                        (b"content-type", b"application/json; charset=utf-8"),
                        (b"x-stand-in", b"1"), (b"content-length", str(len(body)).encode()),
                    ]})  # fmt: skip
                    await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, capture)


def test_a_foreign_job_is_answered_as_the_upstream_answers_an_unknown_one(
    make_proxy: Any, upstream: Upstream
) -> None:
    from proxy.simulator.app import create_simulator

    upstream.sim.state.config.shared_account = True
    standin = DistinctNotFound(create_simulator_with(upstream, create_simulator))
    with serve_in_thread(standin, lifespan="off") as server:
        base = make_proxy(upstream_url=server.url)
        vid = create(base)["id"]
        native, provider = vid.split(":")
        unknown_id = "video_" + "0123456789abcdef01234567" + ":" + provider
        assert native.startswith("video_") and len(native) == len(unknown_id.split(":")[0])
        routes = {
            "retrieve": ("GET", "", None),
            "content": ("GET", "/content", None),
            "events": ("GET", "/events", None),
            "remix": ("POST", "/remix", {"prompt": "b"}),
            "delete": ("DELETE", "", None),
        }
        for name, (method, suffix, body) in routes.items():
            known = httpx.request(
                method, f"{base}/v1/videos/{unknown_id}{suffix}", json=body, headers=BOB
            )
            foreign = httpx.request(
                method, f"{base}/v1/videos/{vid}{suffix}", json=body, headers=BOB
            )
            assert foreign.status_code == known.status_code == 404, name
            assert foreign.json()["stand_in"] is True, name
            assert foreign.text == known.text.replace(unknown_id.split(":")[0], native), name
            ignore = {"date", "x-request-id"}
            assert set(foreign.headers) - ignore == set(known.headers) - ignore, name
            assert foreign.elapsed.total_seconds() >= 0.2, name  # an upstream round trip
        assert httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE).status_code == 200


def create_simulator_with(upstream: Upstream, factory: Any) -> Any:
    """A second ASGI front on the fixture's simulator state (shared jobs and clock)."""
    app = factory(upstream.sim.state.config)
    app.state.simulator.state = upstream.sim.state
    return app


# -- 10. a lock left behind must not stall every replica's polls ---------------------------
def test_redis_unlock_goes_through_an_open_breaker() -> None:
    from proxy.cache.redis import RedisStore

    with redis_server() as redis:

        async def scenario() -> None:
            store = RedisStore(redis.url, 0.5, time.time)
            assert await store.lock("job-key", 10)
            store._down_until = time.monotonic() + 10  # one failure just tripped the breaker
            await store.unlock("job-key")
            await store.aclose()

        asyncio.run(scenario())
        assert redis.command("EXISTS", "bvp:l:job-key") == b":0\r\n"


def test_a_waiting_replica_fetches_as_soon_as_the_lock_is_free(
    upstream: Upstream, tmp_path: Any
) -> None:
    with redis_server() as redis, run_proxy(upstream.url, env=redis_env(redis)) as proc:
        vid = create(proc.url)["id"]
        secret = b"shared-by-replicas"
        key = cache_key(
            "native", vid, tenant_fingerprint([(b"authorization", b"Bearer sk-bf-alice")], secret)
        )
        assert httpx.get(f"{proc.url}/v1/videos/{vid}", headers=ALICE).status_code == 200
        assert redis.command("DEL", "bvp:e:" + key) == b":1\r\n"  # the key is the proxy's
        redis.command("SET", "bvp:l:" + key, "another-replica", "PX", "30000")
        calls, sets = upstream.calls, commands(redis, "set")
        pool = ThreadPoolExecutor(1)
        polled = pool.submit(lambda: httpx.get(f"{proc.url}/v1/videos/{vid}", headers=ALICE))
        wait_until(lambda: commands(redis, "set") > sets, what="the proxy to try the lock")
        assert upstream.calls == calls and not polled.done()  # it waits for the holder
        redis.command("DEL", "bvp:l:" + key)  # the holder ends without storing an answer
        assert polled.result(timeout=5).status_code == 200  # long before the lock's 10 s wait
        assert upstream.calls == calls + 1


def commands(redis: Any, name: str) -> int:
    """How many times Redis ran a command (INFO commandstats)."""
    info = redis.command("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{name}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0

"""The Redis backend against a real Redis-protocol server and real proxy processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Upstream
from tests.redis_server import RedisServer, redis_server
from tests.servers import ProxyProcess, run_proxy, run_replicas
from tests.test_proxy_core import ALICE, create


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def redis_env(redis: RedisServer) -> dict[str, str]:
    return {
        "PROXY_CACHE_BACKEND": "redis",
        "PROXY_REDIS_URL": redis.url,
        "PROXY_CACHE_KEY_SECRET": "shared-by-replicas",
        "PROXY_LOG_LEVEL": "warning",
    }


def status(base: str, vid: str) -> tuple[int, str]:
    r = httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE, timeout=10)
    return r.status_code, r.headers.get("x-cache-status", "")


@pytest.fixture
def replicas(
    redis: RedisServer, upstream: Upstream, tmp_path: Any
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two proxy processes sharing one Redis and one cache_key_secret."""
    with run_replicas(upstream.url, redis_env(redis), tmp_path) as pair:
        yield pair


def test_two_replicas_share_entries(
    replicas: tuple[ProxyProcess, ProxyProcess], upstream: Upstream
) -> None:
    a, b = replicas
    vid = create(a.url)["id"]
    upstream.clock.advance(31)
    assert status(a.url, vid) == (200, "MISS")
    calls = upstream.calls
    assert status(b.url, vid) == (200, "HIT")
    assert status(a.url, vid) == (200, "HIT")
    assert upstream.calls == calls
    # DELETE on one replica invalidates the other's view too.
    assert httpx.delete(f"{b.url}/v1/videos/{vid}", headers=ALICE).status_code == 200
    assert status(a.url, vid) == (404, "MISS")


def test_hundred_concurrent_polls_across_replicas_make_one_call(
    replicas: tuple[ProxyProcess, ProxyProcess], upstream: Upstream
) -> None:
    a, b = replicas
    vid = create(a.url)["id"]
    upstream.clock.advance(31)
    calls = upstream.calls
    upstream.sim.state.faults.append({"delay": 0.5})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            headers=ALICE, limits=httpx.Limits(max_connections=200), timeout=10
        ) as client:
            urls = [f"{(a if i % 2 else b).url}/v1/videos/{vid}" for i in range(100)]
            return await asyncio.gather(*(client.get(u) for u in urls))

    answers = asyncio.run(burst())
    assert {r.status_code for r in answers} == {200}
    assert upstream.calls == calls + 1


def test_redis_outage_serves_from_upstream_and_recovers(
    redis: RedisServer, upstream: Upstream, tmp_path: Any
) -> None:
    with run_proxy(upstream.url, env=redis_env(redis), tmp_path=tmp_path) as a:
        vid = create(a.url)["id"]
        upstream.clock.advance(31)
        assert status(a.url, vid) == (200, "MISS")
        assert status(a.url, vid) == (200, "HIT")
        redis.stop()
        for _ in range(5):
            started = time.monotonic()
            assert status(a.url, vid) == (200, "MISS")
            assert time.monotonic() - started < 2
        redis.start()  # empty again: the next answer is stored, then hit

        def hits_again() -> bool:
            return status(a.url, vid) == (200, "HIT")

        from tests.servers import wait_until

        wait_until(hits_again, timeout=10, what="HITs after Redis restart")
        assert "redis" in a.log() and "serving without the cache" in a.log()


def test_paused_redis_is_bounded_by_redis_timeout(
    redis: RedisServer, upstream: Upstream, tmp_path: Any
) -> None:
    env = {**redis_env(redis), "PROXY_REDIS_TIMEOUT_SECONDS": "0.05"}
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as a:
        vid = create(a.url)["id"]
        upstream.clock.advance(31)
        assert status(a.url, vid) == (200, "MISS")
        redis.command("CLIENT", "PAUSE", "3000", "ALL")
        started = time.monotonic()
        assert status(a.url, vid)[0] == 200
        assert time.monotonic() - started < 1.0


def test_redis_backend_requires_a_secret() -> None:
    exe = Path(sys.executable).with_name("bifrost-video-proxy")
    result = subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=30,
        env={"PROXY_CACHE_BACKEND": "redis", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "cache_key_secret: required" in result.stderr


def test_a_waiter_on_one_replica_wakes_from_another_replicas_poll(
    redis: RedisServer, upstream: Upstream, tmp_path: Any
) -> None:
    """B waits (its own watcher would poll only every 10 s); A's poll stores the
    completed job, Redis pub/sub tells B, and B answers at once."""
    import threading

    from tests.servers import wait_until
    from tests.test_metrics import scrape, value

    env = {**redis_env(redis), "PROXY_POLL_COALESCE_SECONDS": "10"}
    with run_replicas(upstream.url, env, tmp_path) as (a, b):
        vid = create(a.url)["id"]
        out: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: out.append(
                httpx.get(
                    f"{b.url}/v1/videos/{vid}", headers={**ALICE, "Prefer": "wait=60"}, timeout=70
                )
            )
        )
        waiter.start()
        events: list[bytes] = []

        def follow() -> None:
            with httpx.stream(
                "GET", f"{b.url}/v1/videos/{vid}/events", headers=ALICE, timeout=70
            ) as r:
                events.extend(line for line in r.iter_bytes() if b"data: " in line)

        streamer = threading.Thread(target=follow)
        streamer.start()
        wait_until(
            lambda: (
                value(scrape(b.url), "bifrost_proxy_waiters", kind="long_poll") == 1
                and value(scrape(b.url), "bifrost_proxy_waiters", kind="sse") == 1
            ),
            what="B's clients wait",
        )
        upstream.clock.advance(31)  # completed upstream
        r = httpx.get(f"{a.url}/v1/videos/{vid}", headers={**ALICE, "Cache-Control": "no-cache"})
        assert r.json()["status"] == "completed"
        waiter.join(3)  # well before B's own next poll (10 s)
        assert not waiter.is_alive()
        assert out[0].json()["status"] == "completed"
        assert out[0].headers["preference-applied"] == "wait=60"
        streamer.join(3)  # the SSE stream on B ended with the terminal event, too
        assert not streamer.is_alive() and b'"completed"' in b"".join(events)


def test_stale_if_error_with_the_redis_backend(
    redis: RedisServer, upstream: Upstream, tmp_path: Any
) -> None:
    env = {**redis_env(redis), "PROXY_POLL_COALESCE_SECONDS": "0.2"}
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as a:
        vid = create(a.url)["id"]
        assert status(a.url, vid) == (200, "MISS")  # a running snapshot, stored
        for _ in range(3):  # the coalescing window (0.2 s, real time) may not be over yet
            upstream.sim.state.faults.append({"status": 503, "body": b"{}"})
        from tests.servers import wait_until

        wait_until(lambda: status(a.url, vid) == (200, "STALE"), what="a STALE answer")
        upstream.sim.state.faults.clear()
        assert status(a.url, vid)[0] == 200

"""One job, one count: transitions and job durations stay exact with several workers
(the memory backend's host store) and several replicas (Redis), as a real Prometheus
server (Debian's ``prometheus``, the package that ships ``promtool``) scrapes them."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.hoststate import HostStatuses
from tests.conftest import Upstream
from tests.redis_server import redis_server
from tests.servers import free_port, run_proxy, run_replicas, wait_until
from tests.test_metrics import ROOT, promtool, scrape, value
from tests.test_proxy_core import ALICE, create
from tests.test_redis_cache import redis_env

QUIET = {"PROXY_POLL_COALESCE_SECONDS": "0", "PROXY_LOG_LEVEL": "warning"}
TRANSITIONS = "bifrost_proxy_video_status_transitions_total"
DURATIONS = "bifrost_proxy_video_job_duration_seconds_count"
PHASES = [("none", "queued"), ("queued", "in_progress"), ("in_progress", "completed")]


def live_a_job(bases: list[str], upstream: Upstream, polls_per_phase: int = 24) -> str:
    """Create a job and poll it through its life, each poll on a fresh connection (so
    the kernel spreads them over every worker), round-robin over ``bases``."""
    vid = str(create(bases[0])["id"])
    for step in (0, 15, 20):
        upstream.clock.advance(step)
        for i in range(polls_per_phase):
            with httpx.Client() as client:  # a new connection per poll
                r = client.get(f"{bases[i % len(bases)]}/v1/videos/{vid}", headers=ALICE)
                assert r.status_code == 200
    return vid


def assert_one_count_each(samples: dict[Any, float]) -> None:
    for before, after in PHASES:
        counted = value(
            samples, TRANSITIONS, provider="openai", from_status=before, to_status=after
        )
        assert counted == 1, (before, after, counted)
    assert sum(v for (name, _), v in samples.items() if name == TRANSITIONS) == 3
    assert value(samples, DURATIONS, provider="openai", outcome="completed") == 1


def test_two_workers_on_memory_count_each_transition_once(
    upstream: Upstream, tmp_path: Any
) -> None:
    with run_proxy(upstream.url, "--workers", "2", env=QUIET, tmp_path=tmp_path) as proc:
        live_a_job([proc.url], upstream)
        assert_one_count_each(scrape(proc.url))


def test_two_replicas_on_redis_count_each_transition_once(
    upstream: Upstream, tmp_path: Any
) -> None:
    with redis_server() as redis:
        env = {**redis_env(redis), **QUIET}
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            live_a_job([a.url, b.url], upstream)
            sa, sb = scrape(a.url), scrape(b.url)
            summed = {k: sa.get(k, 0.0) + sb.get(k, 0.0) for k in {*sa, *sb}}
            assert_one_count_each(summed)


def test_redis_cache_gauges_sum_to_the_shared_store(upstream: Upstream, tmp_path: Any) -> None:
    with redis_server() as redis:
        env = {**redis_env(redis), "PROXY_LOG_LEVEL": "warning"}
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            videos = [create(a.url)["id"] for _ in range(3)]
            upstream.clock.advance(31)
            for i, vid in enumerate(videos):  # stored by either replica
                assert (
                    httpx.get(f"{(a, b)[i % 2].url}/v1/videos/{vid}", headers=ALICE).status_code
                    == 200
                )

            def summed(name: str) -> float:
                return value(scrape(a.url), name) + value(scrape(b.url), name)

            wait_until(lambda: summed("bifrost_proxy_cache_entries") == 3, what="3 shared entries")
            keys = [k for k in redis.command("KEYS", "bvp:e:*").split() if k.startswith(b"bvp:e:")]
            sizes = [int(redis.command("STRLEN", k.decode())[1:].strip()) for k in keys]
            assert len(keys) == 3 and summed("bifrost_proxy_cache_bytes") == sum(sizes)


def test_host_statuses_are_atomic_across_processes(tmp_path: Path) -> None:
    """Eight processes race to record one change: exactly one sees it as new."""
    HostStatuses(str(tmp_path)).close()
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        previous = pool.map(_swap_once, [str(tmp_path)] * 8)
    assert sorted(previous, key=str) == [None] + ["queued"] * 7


def _swap_once(directory: str) -> str | None:
    import asyncio

    store = HostStatuses(directory)
    try:
        return asyncio.run(store.swap("video_1:openai", "queued"))
    finally:
        store.close()


def test_host_statuses_stay_bounded(tmp_path: Path) -> None:
    import asyncio

    store = HostStatuses(str(tmp_path), max_rows=500)

    async def fill() -> None:
        for i in range(3000):
            await store.swap(f"video_{i}:openai", "queued")

    asyncio.run(fill())
    assert store.rows() <= 500 + 1000  # trimmed every 1000 writes
    assert asyncio.run(store.swap("video_2999:openai", "completed")) == "queued"  # newest kept
    store.close()


# -- a real Prometheus server ------------------------------------------------------------
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        promtool()  # installs Debian's prometheus package when missing
        found = shutil.which("prometheus")
    assert found, "prometheus not found after installing Debian's prometheus package"
    return found


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus server; the test writes its config before the server starts."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    holder: dict[str, subprocess.Popen[bytes]] = {}

    def start(target_port: int) -> str:
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{ROOT / 'config/prometheus/alerts.yml'}']\n"
            "scrape_configs:\n"
            "  - job_name: bifrost-video-proxy\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        holder["p"] = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(url + "/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=30, what="prometheus ready")
        return url

    yield start, tmp_path  # type: ignore[misc]
    process = holder.get("p")
    if process is not None:
        process.terminate()
        process.wait(20)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(url + "/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_a_real_prometheus_sees_one_count_per_transition(
    upstream: Upstream, tmp_path: Path, prometheus: Any
) -> None:
    start, _ = prometheus
    with run_proxy(upstream.url, "--workers", "2", env=QUIET, tmp_path=tmp_path) as proc:
        url = start(proc.port)

        def target_up() -> bool:
            targets = httpx.get(url + "/api/v1/targets").json()["data"]["activeTargets"]
            return len(targets) == 1 and targets[0]["health"] == "up"

        wait_until(target_up, timeout=30, what="the proxy scraped and up")
        live_a_job([proc.url], upstream)
        # Wait for a scrape that includes the job's end, then one more.
        wait_until(lambda: bool(query(url, DURATIONS)), timeout=30, what="the job's end scraped")
        wait_until(
            lambda: bool(query(url, f"count_over_time({DURATIONS}[30s]) >= 2")),
            timeout=30,
            what="a second scrape after the job's end",
        )
        result = query(url, f"sum by (from_status, to_status) ({TRANSITIONS})")
        counts = {
            (r["metric"]["from_status"], r["metric"]["to_status"]): r["value"][1] for r in result
        }
        print("prometheus:", f"sum by (from_status, to_status) ({TRANSITIONS}) =", counts)
        assert counts == {phase: "1" for phase in PHASES}
        durations = query(url, f"sum({DURATIONS})")
        print("prometheus:", f"sum({DURATIONS}) =", durations[0]["value"][1])
        assert durations[0]["value"][1] == "1"
        assert query(url, "up")[0]["value"][1] == "1"

        def rules_healthy() -> bool:
            groups = httpx.get(url + "/api/v1/rules").json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return len(rules) == 11 and all(rule["health"] == "ok" for rule in rules)

        wait_until(rules_healthy, timeout=30, what="every alert rule evaluated and healthy")
        firing = query(url, 'ALERTS{alertstate="firing"}')
        assert firing == []

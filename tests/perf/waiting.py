"""The waiting benchmark: long-polls and SSE streams on running jobs, two replicas, one Redis.

    python -m tests.perf.waiting [--long-polls 1000] [--streams 100] [--jobs 20]

Starts the simulator (jobs queued 2 s, in progress 4 s), a real Redis-protocol server
and two proxy processes (the console script, Redis backend, poll_coalesce_seconds 1).
Half the clients wait on each replica. It reports upstream retrieves per job against
the issue's bound (duration ÷ poll_coalesce_seconds + 2), the wake latency from the
moment the upstream first answered "completed" for a job to each client seeing it (p50,
p99), proxy RSS per waiter, and whether any waiter is left after clients hang up.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import psutil
from starlette.types import Message, Receive, Scope, Send

from proxy.simulator.app import SimulatorConfig, create_simulator
from tests.redis_server import redis_server
from tests.servers import run_proxy, serve_in_thread
from tests.test_metrics import scrape, value

AUTH = {"Authorization": "Bearer sk-bf-bench"}
QUEUED, RUNNING, INTERVAL = 2.0, 4.0, 1.0


class Observed:
    """ASGI wrapper around the simulator: retrieves per job, and when each job's first
    "completed" answer left the upstream."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.retrieves: Counter[str] = Counter()
        self.completed_at: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        parts = path.strip("/").split("/")
        job = (
            parts[2]
            if scope["type"] == "http" and scope["method"] == "GET" and len(parts) == 3
            else None
        )
        if job is None:
            await self.app(scope, receive, send)
            return
        self.retrieves[job] += 1

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.body" and b'"completed"' in message.get(
                "body", b""
            ):
                self.completed_at.setdefault(job, time.time())
            await send(message)

        await self.app(scope, receive, observed)


async def long_poll(session: aiohttp.ClientSession, url: str, seen: list[float]) -> None:
    while True:
        async with session.get(url, headers={**AUTH, "Prefer": "wait=30"}) as r:
            job = await r.json()
        if job["status"] in ("completed", "failed"):
            seen.append(time.time())
            return


async def stream(session: aiohttp.ClientSession, url: str, seen: list[float]) -> None:
    async with session.get(url, headers=AUTH) as r:
        async for line in r.content:
            if line.startswith(b"data: ") and b'"completed"' in line:
                seen.append(time.time())
                return


def rss(proc: Any) -> float:
    return float(psutil.Process(proc.process.pid).memory_info().rss)


async def run(args: argparse.Namespace, replicas: list[Any], observed: Observed) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        jobs = []
        for i in range(args.jobs):
            async with session.post(
                replicas[i % 2].url + "/v1/videos",
                json={"model": "openai/sora-2", "prompt": "x"},
                headers=AUTH,
            ) as r:
                jobs.append((await r.json())["id"])
        created = time.time()
        before = [rss(p) for p in replicas]
        seen: dict[str, list[float]] = {job: [] for job in jobs}
        tasks = []
        for i in range(args.long_polls):
            job = jobs[i % len(jobs)]
            url = f"{replicas[i % 2].url}/v1/videos/{job}"
            tasks.append(asyncio.ensure_future(long_poll(session, url, seen[job])))
        for i in range(args.streams):
            job = jobs[i % len(jobs)]
            url = f"{replicas[i % 2].url}/v1/videos/{job}/events"
            tasks.append(asyncio.ensure_future(stream(session, url, seen[job])))
        peak_waiters, peak_rss = 0.0, before
        while time.time() - created < QUEUED + RUNNING - 0.5:  # all waiting, none done yet
            await asyncio.sleep(0.5)
            waiting = sum(
                value(scrape(p.url), "bifrost_proxy_waiters", kind=k)
                for p in replicas for k in ("long_poll", "sse")
            )  # fmt: skip
            if waiting >= peak_waiters:
                peak_waiters, peak_rss = waiting, [rss(p) for p in replicas]
        await asyncio.gather(*tasks)
        latencies = [t - observed.completed_at[job] for job, times in seen.items() for t in times]
        # Hang-ups: clients that leave mid-wait must leave no waiter behind.
        async with session.post(
            replicas[0].url + "/v1/videos",
            json={"model": "openai/sora-2", "prompt": "y"},
            headers=AUTH,
        ) as r:
            late = (await r.json())["id"]
        quitters = [
            asyncio.ensure_future(long_poll(session, f"{replicas[i % 2].url}/v1/videos/{late}", []))
            for i in range(200)
        ]
        await asyncio.sleep(1.0)
        for task in quitters:
            task.cancel()
        await asyncio.gather(*quitters, return_exceptions=True)
    left = -1.0
    for _ in range(50):
        left = sum(
            value(scrape(p.url), "bifrost_proxy_waiters", kind=k)
            for p in replicas for k in ("long_poll", "sse")
        )  # fmt: skip
        if left == 0:
            break
        await asyncio.sleep(0.1)
    per_job = [observed.retrieves[job] for job in jobs]
    return {
        "clients": args.long_polls + args.streams,
        "peak_waiters": peak_waiters,
        "retrieves_per_job_max": max(per_job),
        "retrieves_per_job_bound": (QUEUED + RUNNING) / INTERVAL + 2,
        "wake_p50_ms": statistics.median(latencies) * 1000,
        "wake_p99_ms": statistics.quantiles(latencies, n=100)[98] * 1000,
        "rss_per_waiter_kib": (sum(peak_rss) - sum(before)) / max(peak_waiters, 1) / 1024,
        "waiters_left_after_hang_ups": left,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.waiting")
    parser.add_argument("--long-polls", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    sim = create_simulator(SimulatorConfig(queued_seconds=QUEUED, in_progress_seconds=RUNNING))
    observed = Observed(sim)
    with redis_server() as redis, serve_in_thread(observed, lifespan="off") as upstream:
        env = {
            "PROXY_CACHE_BACKEND": "redis", "PROXY_REDIS_URL": redis.url,
            "PROXY_CACHE_KEY_SECRET": "bench", "PROXY_LOG_LEVEL": "warning",
            "PROXY_POLL_COALESCE_SECONDS": str(INTERVAL),
        }  # fmt: skip
        with run_proxy(upstream.url, env=env) as a, run_proxy(upstream.url, env=env) as b:
            results = asyncio.run(run(args, [a, b], observed))
    width = max(len(k) for k in results)
    print("waiting benchmark: two replicas on one Redis, poll_coalesce_seconds 1", file=sys.stderr)
    for key, result in results.items():
        print(
            f"  {key:<{width}}  {result:.1f}"
            if isinstance(result, float)
            else f"  {key:<{width}}  {result}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

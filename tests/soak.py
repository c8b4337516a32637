"""Soak: a realistic mix through the real proxy for a while, then a report.

    python -m tests.soak [--duration SECONDS] [--workers N]

Two tenants create jobs, poll them to completion every 100 ms (and a few times
after), list, download, remix, delete, and send bad input; the simulator is the
upstream. Reports answers by kind (anything unexpected is an error), p50/p99 latency,
and the proxy's RSS and open file descriptors at start (after a warm-up) and end.
Exits non-zero on any unexpected answer or a drift above 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import psutil

from proxy.simulator.app import SimulatorConfig, create_simulator
from tests.servers import run_proxy, serve_in_thread

TENANTS = ["Bearer sk-bf-soak-tenant-a", "Bearer sk-bf-soak-tenant-b"]


class Soak:
    def __init__(self, base: str) -> None:
        self.base = base
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []

    async def call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        expect: set[int],
        tenant: str,
        **kw: Any,
    ) -> tuple[int, Any]:
        started = time.perf_counter()
        try:
            async with session.request(
                method, self.base + path, headers={"Authorization": tenant}, **kw
            ) as r:
                body = await r.read()
                status = r.status
        except aiohttp.ClientError as exc:
            self.outcomes[f"unexpected {method} transport {type(exc).__name__}"] += 1
            return 0, None
        self.latencies.append(time.perf_counter() - started)
        kind = "ok" if status in expect else "unexpected"
        self.outcomes[f"{kind} {method} {status}"] += 1
        if "json" in r.headers.get("content-type", "") and body:
            import orjson

            return status, orjson.loads(body)
        return status, body

    async def journey(self, session: aiohttp.ClientSession) -> None:
        tenant, other = random.sample(TENANTS, 2)
        # Providers with list, remix and delete in Bifrost (Runway has no list or remix,
        # Runware no delete: their refusals would be "unexpected" here).
        model = random.choice(
            ["gemini/veo-3.1-fast-generate-001", "replicate/minimax-video-01", "openai/sora-2"]
        )
        prompt = "please fail" if random.random() < 0.1 else "a cat"
        status, job = await self.call(
            session, "POST", "/v1/videos", {200}, tenant, json={"model": model, "prompt": prompt}
        )
        if status != 200:
            return
        vid = job["id"]
        while True:
            _, polled = await self.call(session, "GET", f"/v1/videos/{vid}", {200}, tenant)
            if not isinstance(polled, dict) or polled.get("status") in ("completed", "failed"):
                break
            await asyncio.sleep(0.1)
        for _ in range(3):
            await self.call(session, "GET", f"/v1/videos/{vid}", {200}, tenant)
        await self.call(session, "GET", f"/v1/videos/{vid}", {404}, other)  # isolation
        await self.call(
            session, "GET", f"/v1/videos?provider={model.split('/')[0]}&limit=5", {200}, tenant
        )
        if isinstance(polled, dict) and polled.get("status") == "completed":
            await self.call(session, "GET", f"/v1/videos/{vid}/content", {200}, tenant)
            status, remix = await self.call(
                session, "POST", f"/v1/videos/{vid}/remix", {200}, tenant, json={"prompt": "again"}
            )
            if status == 200:
                await self.call(session, "DELETE", f"/v1/videos/{remix['id']}", {200}, tenant)
        await self.call(session, "GET", "/v1/videos/not-an-id:", {400}, tenant)
        await self.call(session, "GET", f"/v1/videos/{vid}/content?variant=GIF", {400}, tenant)
        await self.call(session, "DELETE", f"/v1/videos/{vid}", {200}, tenant)


def snapshot(proc: psutil.Process) -> tuple[float, int]:
    """RSS and descriptors once idle keep-alive connections have expired (uvicorn 5 s,
    aiohttp's pool 15 s) and the descriptor count has held still for 2 s, so both
    readings are taken in the same quiet state."""
    time.sleep(16)
    fds, steady_since = proc.num_fds(), time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() - steady_since < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = proc.num_fds()
        if now != fds:
            fds, steady_since = now, time.monotonic()
    return proc.memory_info().rss / 2**20, fds


async def drive(soak: Soak, seconds: float, workers: int) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                await soak.journey(session)

        await asyncio.gather(*(worker() for _ in range(workers)))


# Short lifetimes, so that every store the proxy keeps (terminal answers, ownership and
# idempotency records) reaches its steady state within the warm-up and the first
# minute: with the defaults (answers for an hour, owners for a week) the caches fill for
# the whole soak, by design, and RSS growth would measure that, not a leak.
SOAK_ENV = {
    "PROXY_LOG_LEVEL": "warning",
    "PROXY_TERMINAL_TTL_SECONDS": "10",
    "PROXY_MAX_TTL_SECONDS": "30",
    "PROXY_IDEMPOTENCY_TTL_SECONDS": "30",
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--workers", type=int, default=40, help="concurrent journeys")
    args = parser.parse_args()
    sim = create_simulator(
        SimulatorConfig(queued_seconds=0.5, in_progress_seconds=1.5, content_bytes=256 * 1024)
    )
    with (
        serve_in_thread(sim, lifespan="off") as upstream,
        run_proxy(upstream.url, env=SOAK_ENV) as proxy,
    ):
        proc = psutil.Process(proxy.process.pid)
        warm = Soak(proxy.url)
        asyncio.run(drive(warm, min(20.0, args.duration / 10), args.workers))
        rss0, fds0 = snapshot(proc)
        soak = Soak(proxy.url)
        started = time.monotonic()
        asyncio.run(drive(soak, args.duration, args.workers))
        elapsed = time.monotonic() - started
        rss1, fds1 = snapshot(proc)
        alive = proxy.process.poll() is None
    lat = sorted(soak.latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[int(len(lat) * 0.99) - 1] * 1000
    unexpected = sum(n for k, n in soak.outcomes.items() if k.startswith("unexpected"))
    drift_rss, drift_fds = (rss1 - rss0) / rss0, (fds1 - fds0) / max(fds0, 1)
    print(
        f"soak: {elapsed:.0f} s, {args.workers} concurrent journeys, {len(lat)} requests ({len(lat) / elapsed:.0f}/s), pid {os.getpid()}"
    )
    for kind, n in sorted(soak.outcomes.items()):
        print(f"  {kind:<40} {n}")
    print(f"  unexpected answers: {unexpected}")
    print(f"  latency p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(
        f"  proxy RSS {rss0:.1f} -> {rss1:.1f} MiB ({drift_rss:+.1%}), fds {fds0} -> {fds1} ({drift_fds:+.1%}), alive: {alive}"
    )
    ok = unexpected == 0 and abs(drift_rss) < 0.10 and abs(drift_fds) < 0.10 and alive
    print("  verdict:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

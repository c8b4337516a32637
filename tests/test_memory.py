"""Memory per cached entry: what the RSS-per-10k-entries benchmark figure rests on."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc

import httpx

from proxy.app import create_app
from tests.conftest import make_settings
from tests.test_properties import _Streamed

JOB = {"object": "video", "status": "completed", "model": "openai/sora-2", "progress": 100,
       "seconds": "8", "size": "1280x720", "created_at": 1795000000,
       "completed_at": 1795000060, "prompt": "a cat on a skateboard, golden hour"}  # fmt: skip


def test_a_cached_entry_costs_about_its_bytes() -> None:
    """orjson's dumps keeps a 4 KiB allocation under a small answer; kept as the cached
    body, that was most of an entry's memory (5.8 KiB an entry, now 2.5)."""
    expires = int(time.time()) + 86400

    def answer(request: httpx.Request) -> httpx.Response:
        vid = request.url.raw_path.decode().rsplit("/", 1)[1]
        body = json.dumps(dict(JOB, id=vid, expires_at=expires)).encode()
        return httpx.Response(
            200, headers={"content-type": "application/json"}, stream=_Streamed(body)
        )

    app = create_app(
        make_settings("http://up.test", upstream_client="httpx", poll_coalesce_seconds=0),
        transport=httpx.MockTransport(answer),
    )

    async def fill(n: int) -> float:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://p") as client:
                auth = {"authorization": "Bearer k"}
                for i in range(200):  # warm every per-process cache and pool
                    await client.get(f"/v1/videos/warm_{i}:openai", headers=auth)
                gc.collect()
                tracemalloc.start()
                try:
                    before = tracemalloc.get_traced_memory()[0]
                    for i in range(n):
                        r = await client.get(f"/v1/videos/done_{i}:openai", headers=auth)
                        assert r.status_code == 200
                    gc.collect()
                    grown = tracemalloc.get_traced_memory()[0] - before
                finally:
                    tracemalloc.stop()
                assert app.state.services.cache.stats()[0] >= n
                return grown / n

    per_entry = asyncio.run(fill(1000))
    assert per_entry < 3500, f"{per_entry:.0f} bytes traced per cached entry"

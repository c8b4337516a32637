"""Access lines (issue 22): written off the event loop in slices, and never lost: every
request's line is written, in order within its kind, including at shutdown."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import Upstream
from tests.servers import run_proxy, wait_until
from tests.test_proxy_core import ALICE, create


def test_every_line_is_written_even_at_shutdown(upstream: Upstream, tmp_path: Any) -> None:
    with run_proxy(upstream.url, tmp_path=tmp_path) as proc:
        vid = create(proc.url)["id"]
        upstream.clock.advance(31)
        with httpx.Client() as client:
            for i in range(1200):  # hits (the fast path) and misses (the app) mixed
                path = f"/v1/videos/{vid}" if i % 4 else f"/v1/videos/video_{i}:openai"
                client.get(proc.url + path, headers={**ALICE, "X-Request-ID": f"r-{i}"})
        proc.process.terminate()  # before the next once-a-second flush
        proc.process.wait(15)
        lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    ids = [line["request_id"] for line in lines if line.get("message") == "access"]
    wanted = {f"r-{i}" for i in range(1200)}
    assert wanted <= set(ids) and len([i for i in ids if i in wanted]) == 1200
    hits = [line for line in lines if line.get("cache") == "HIT"]
    assert len(hits) >= 800  # the fast path's lines too
    hit_order = [int(h["request_id"][2:]) for h in hits if h["request_id"] in wanted]
    assert hit_order == sorted(hit_order)


def test_lines_reach_the_log_within_the_flush_interval(upstream: Upstream, tmp_path: Any) -> None:
    with run_proxy(upstream.url, tmp_path=tmp_path) as proc:
        httpx.get(proc.url + "/v1/videos/video_x:openai", headers={"X-Request-ID": "soon"})
        wait_until(lambda: '"request_id":"soon"' in proc.log(), timeout=5, what="the line")


def test_fast_hit_lines_are_byte_identical_to_the_general_format() -> None:
    import asyncio
    import logging
    import weakref

    from proxy import logs
    from proxy.hotpath import HotHit, hit_row

    handler = logging.StreamHandler()
    handler.setFormatter(logs.JsonFormatter())
    root, proxy_log = logging.getLogger(), logging.getLogger("proxy")
    saved = root.handlers[:], proxy_log.level
    root.handlers[:] = [handler]
    proxy_log.setLevel(logging.INFO)
    try:

        class Dummy:
            pass

        ref: Any = weakref.ref(Dummy())
        hits = [
            (1795000000.123, HotHit("k", ref, 0, "gemini", []), 0.0004567, "rid-1"),
            (1795000001.999, HotHit("k", ref, 1, "other", []), 1.25, 'we"ird\\id'),
        ]
        writer = logs.AccessWriter()
        writer.close()  # no consumer: what is submitted stays in the queue, to read here
        asyncio.run(writer.write_hits(hits, hit_row))
        expected = logs.access_lines([hit_row(h) for h in hits], {})
        assert writer._batches.get_nowait() == expected
        assert writer._batches.empty()
    finally:
        root.handlers[:], _ = saved[0], proxy_log.setLevel(saved[1])

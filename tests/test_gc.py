"""The garbage collector after start-up (issue 22): settled (collected, frozen, higher
thresholds) while the app runs, restored after, and still collecting the cycles that
requests make (a failing upstream call leaves a traceback cycle behind)."""

from __future__ import annotations

import gc
from typing import Any

import httpx

from proxy.gctune import THRESHOLDS
from tests.servers import free_port


def test_settled_while_running_and_restored_after(upstream: Any) -> None:
    import asyncio

    from proxy.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(upstream.url))
    before = gc.get_threshold()

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            assert gc.get_threshold() == THRESHOLDS
            assert gc.get_freeze_count() > 10_000  # start-up's objects: never scanned again

    asyncio.run(scenario())
    assert gc.get_threshold() == before != THRESHOLDS
    assert gc.get_freeze_count() == 0


def test_cycles_made_by_requests_are_still_collected(make_proxy: Any) -> None:
    base = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")  # refuses: 502s
    passes: list[tuple[int, int]] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            passes.append((info["generation"], info["collected"]))

    gc.callbacks.append(record)
    try:
        with httpx.Client() as client:
            for i in range(3000):
                r = client.get(f"{base}/v1/videos/video_{i}:openai")
                assert r.status_code == 502
    finally:
        gc.callbacks.remove(record)
    assert passes, "the collector never ran"
    assert sum(collected for _, collected in passes) > 0  # and it freed the cycles
    # Bounded: the young generation never holds more than its threshold for long.
    assert gc.get_count()[0] < THRESHOLDS[0]

"""Job status transitions, each counted once however often a job is polled.

The last status seen per canonical id is kept in a bounded LRU; with Redis, an
atomic get-and-set (``SET … GET``) decides across replicas who saw a change first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import LRUCache

from . import metrics
from .ids import KNOWN_PROVIDERS
from .policy import TERMINAL

KNOWN = frozenset({"queued", "in_progress", "completed", "failed"})
Swap = Callable[[str, str], Awaitable[str | None]]  # (id, status) -> previous, shared


def provider_label(provider: str) -> str:
    return provider if provider in KNOWN_PROVIDERS else "other"


class StatusTracker:
    def __init__(self, maxsize: int = 100_000, swap: Swap | None = None) -> None:
        self._last: LRUCache[str, str] = LRUCache(maxsize)
        self._swap = swap

    async def observe(self, video_id: str, provider: str, doc: dict[str, Any]) -> None:
        raw = doc.get("status")
        status = raw if raw in KNOWN else "unknown"
        previous = self._last.get(video_id)
        if previous == status:
            return
        self._last[video_id] = status
        if self._swap is not None:
            shared = await self._swap(video_id, status)
            if shared == status:
                return  # another replica counted this change already
            previous = shared if shared is not None else previous
        label = provider_label(provider)
        metrics.TRANSITIONS.labels(label, previous or "none", status).inc()
        if status in TERMINAL and previous not in TERMINAL:
            created, completed = doc.get("created_at"), doc.get("completed_at")
            if isinstance(created, (int, float)) and isinstance(completed, (int, float)):
                duration = completed - created
                if duration >= 0:
                    metrics.JOB_DURATION.labels(label, status).observe(duration)

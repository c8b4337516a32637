"""stale-if-error (RFC 5861): the last running snapshot of each job, kept for
``stale_if_error_seconds`` so an upstream failure can be answered with it."""

from __future__ import annotations

from cachetools import LRUCache

from .cache import Entry
from .exchange import Reply
from .policy import EntryKind


class StaleSnapshots:
    """Per canonical id, per cache key (tenant): the last running snapshot (bounded)."""

    def __init__(self, window_seconds: float, max_jobs: int = 10_000) -> None:
        self.window = window_seconds
        self._jobs: LRUCache[str, dict[str, Entry]] = LRUCache(max_jobs)

    def remember(self, video: str, key: str, entry: Entry) -> None:
        if self.window <= 0:
            return
        keys = self._jobs.get(video)
        if entry.kind is EntryKind.RUNNING:
            if keys is None:
                keys = self._jobs[video] = {}
            keys[key] = entry
        elif keys is not None:  # terminal now: the cache itself answers from here on
            keys.pop(key, None)

    def get(self, video: str, key: str, now: float) -> Reply | None:
        entry = (self._jobs.get(video) or {}).get(key)
        if entry is None or now - entry.stored_at > self.window:
            return None
        return Reply(entry.status, entry.headers, entry.body, entry, stale=True)

    def forget(self, video: str) -> None:
        """The job was deleted: never answer for it again."""
        self._jobs.pop(video, None)

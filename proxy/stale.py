"""stale-if-error (RFC 5861): the last running snapshot of each job, kept for
``stale_if_error_seconds`` so an upstream failure can be answered with it.

Snapshots are per process, so a DELETE leaves a tombstone in the record store (shared
by replicas on Redis, by workers through the host): no process answers STALE for a job
deleted through any other. When the store cannot say, no stale answer is given."""

from __future__ import annotations

import logging

from cachetools import LRUCache

from .cache import Entry
from .cache.base import DELETED, RecordsFull, RecordStore, RecordsUnavailable
from .exchange import Reply
from .policy import EntryKind

log = logging.getLogger("proxy.stale")
TOMBSTONE_SLACK_SECONDS = 60.0


class StaleSnapshots:
    """Per canonical id, per cache key (tenant): the last running snapshot (bounded)."""

    records: RecordStore | None = None  # set once the store is open

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

    async def get(self, video: str, key: str, now: float) -> Reply | None:
        entry = (self._jobs.get(video) or {}).get(key)
        if entry is None or now - entry.stored_at > self.window:
            return None
        if await self._deleted(video):
            self.forget(video)
            return None
        return Reply(entry.status, entry.headers, entry.body, entry, stale=True)

    async def _deleted(self, video: str) -> bool:
        if self.records is None:
            return False
        try:
            [mark] = await self.records.get_records([DELETED + video])
        except RecordsUnavailable:
            return True  # cannot tell: the upstream's own answer, not a snapshot
        return mark is not None

    def forget(self, video: str) -> None:
        """The job was deleted: never answer for it again (in this process)."""
        self._jobs.pop(video, None)

    async def deleted(self, video: str) -> None:
        """The job was deleted through this process: tell every other one."""
        self.forget(video)
        if self.records is None or self.window <= 0:
            return
        try:
            await self.records.put_record(
                DELETED + video, b"1", self.window + TOMBSTONE_SLACK_SECONDS
            )
        except (RecordsUnavailable, RecordsFull):
            log.warning("deletion tombstone not written: other replicas may answer STALE")

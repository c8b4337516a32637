"""The default store: per-process memory, bounded by bytes, LRU, per-item expiry.

Three kinds share one byte budget (``cache_max_bytes``): retrieve answers,
idempotency records and job-ownership records. When room is needed, expired items go
first, then idempotency records (oldest use first), then answers, and ownership records
last: a burst of idempotent creates never pushes a terminal answer out, and ownership,
a security record, is the last thing given up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from cachetools import TLRUCache

from .base import IDEMPOTENCY, OWNERSHIP, Entry

RECORD_OVERHEAD = 120  # bytes of bookkeeping per record (key, tuple, LRU links)


class _Cache(TLRUCache[str, Any]):
    """cachetools' TLRU cache that counts evictions made to respect the byte bound."""

    def __init__(
        self,
        maxsize: int,
        timer: Callable[[], float],
        on_evict: Callable[[], None],
        ttu: Callable[[str, Any, float], float],
        getsizeof: Callable[[Any], float],
    ) -> None:
        super().__init__(maxsize, ttu=ttu, timer=timer, getsizeof=getsizeof)
        self.evictions = 0
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, Any]:
        item = super().popitem()
        self.evictions += 1
        self._on_evict()
        return item


Record = tuple[bytes, float]  # (value, deadline)


def _entry_deadline(_key: str, entry: Entry, _now: float) -> float:
    return entry.deadline


def _entry_size(entry: Entry) -> int:
    return entry.size


def _record_deadline(_key: str, record: Record, _now: float) -> float:
    return record[1]


def _record_size(record: Record) -> int:
    return len(record[0]) + RECORD_OVERHEAD


class MemoryStore:
    name = "memory"

    def __init__(
        self,
        max_bytes: int,
        clock: Callable[[], float],
        on_evict: Callable[[], None] = lambda: None,
    ) -> None:
        self._max = max_bytes
        self._clock = clock
        self._cache = _Cache(max_bytes, clock, on_evict, _entry_deadline, _entry_size)
        self._idempotency = _Cache(max_bytes, clock, on_evict, _record_deadline, _record_size)
        self._ownership = _Cache(max_bytes, clock, on_evict, _record_deadline, _record_size)
        # Eviction order when the shared budget is short.
        self._tiers = (self._idempotency, self._cache, self._ownership)

    @property
    def evictions(self) -> int:
        return sum(tier.evictions for tier in self._tiers)

    def _used(self) -> float:
        return sum(tier.currsize for tier in self._tiers)

    def _make_room(self, size: int) -> bool:
        """Evict by tier until ``size`` more bytes fit; False if they never can."""
        if size > self._max:
            return False
        if self._used() + size <= self._max:
            return True
        for tier in self._tiers:
            tier.expire()
        for tier in self._tiers:
            while self._used() + size > self._max:
                try:
                    tier.popitem()
                except KeyError:  # this tier is empty: on to the next
                    break
        return True

    def get_nowait(self, key: str) -> Entry | None:
        entry: Entry | None = self._cache.get(key)
        return entry

    async def get(self, key: str) -> Entry | None:
        return self.get_nowait(key)

    async def put(self, key: str, entry: Entry) -> None:
        self._cache.pop(key, None)  # a refresh: its old bytes are not in the way
        if self._make_room(entry.size):
            with contextlib.suppress(ValueError):  # larger than the whole cache
                self._cache[key] = entry

    async def delete_video(self, video_id: str) -> int:
        # Deletes are rare; a scan keeps the store free of a second index to maintain.
        doomed = [k for k, e in list(self._cache.items()) if e.video_id == video_id]
        for key in doomed:
            self._cache.pop(key, None)
        return len(doomed)

    async def clear(self) -> int:
        """Drop the cached answers (records are not a cache: they stay)."""
        count = len(self._cache)
        self._cache.clear()
        return count

    async def lock(self, key: str, seconds: float) -> bool:
        return True  # in-process single flight already covers one process

    async def unlock(self, key: str) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def listen(self, on_key: Callable[[str], None]) -> None:
        return  # one process: its watchers see their own puts

    def stats(self) -> tuple[int, int]:
        return len(self._cache), int(self._cache.currsize)

    async def refresh_stats(self) -> None:
        for tier in self._tiers:
            tier.expire()

    # -- records (idempotency, ownership) ------------------------------------------------
    def _tier(self, name: str) -> _Cache:
        if name.startswith(IDEMPOTENCY):
            return self._idempotency
        if name.startswith(OWNERSHIP):
            return self._ownership
        raise ValueError(f"unknown record kind: {name[:8]!r}")

    async def get_records(self, names: list[str]) -> list[bytes | None]:
        found = [self._tier(name).get(name) for name in names]
        return [record[0] if record is not None else None for record in found]

    async def put_record(
        self, name: str, value: bytes, ttl: float, *, only_new: bool = False
    ) -> bool:
        tier = self._tier(name)
        if only_new and tier.get(name) is not None:
            return False
        tier.pop(name, None)
        record = (value, self._clock() + ttl)
        if ttl <= 0 or not self._make_room(_record_size(record)):
            return False
        tier[name] = record
        return True

    async def delete_record(self, name: str) -> None:
        self._tier(name).pop(name, None)

    def record_stats(self) -> tuple[int, int]:
        """(records, bytes) of idempotency and ownership records held."""
        tiers = (self._idempotency, self._ownership)
        return sum(len(t) for t in tiers), int(sum(t.currsize for t in tiers))

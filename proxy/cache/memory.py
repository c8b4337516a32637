"""The default store: per-process memory, bounded by bytes, LRU, per-item expiry."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from cachetools import TLRUCache

from .base import Entry


class _Cache(TLRUCache[str, Entry]):
    """cachetools' TLRU cache that counts evictions made to respect the byte bound."""

    def __init__(
        self, maxsize: int, timer: Callable[[], float], on_evict: Callable[[], None]
    ) -> None:
        super().__init__(
            maxsize, ttu=lambda _k, entry, _now: entry.deadline, timer=timer, getsizeof=_size
        )
        self.evictions = 0
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, Entry]:
        item = super().popitem()
        self.evictions += 1
        self._on_evict()
        return item


def _size(entry: Entry) -> int:
    return entry.size


class MemoryStore:
    name = "memory"

    def __init__(
        self,
        max_bytes: int,
        clock: Callable[[], float],
        on_evict: Callable[[], None] = lambda: None,
    ) -> None:
        self._cache = _Cache(max_bytes, clock, on_evict)

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    def get_nowait(self, key: str) -> Entry | None:
        return self._cache.get(key)

    async def get(self, key: str) -> Entry | None:
        return self._cache.get(key)

    async def put(self, key: str, entry: Entry) -> None:
        # A ValueError means larger than the whole cache: simply not stored.
        with contextlib.suppress(ValueError):
            self._cache[key] = entry

    async def delete_video(self, video_id: str) -> int:
        # Deletes are rare; a scan keeps the store free of a second index to maintain.
        doomed = [k for k, e in list(self._cache.items()) if e.video_id == video_id]
        for key in doomed:
            self._cache.pop(key, None)
        return len(doomed)

    async def clear(self) -> int:
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

"""The default store: per-process memory, bounded by bytes, LRU, per-item expiry.

Each kind has a budget of its own, so no kind is ever given up to make room for another
(a lost answer costs one GET; a lost idempotency record costs a video):

- retrieve answers, ``cache_max_bytes``: kept per tenant (the fingerprint that ends
  every cache key). When room is needed, expired answers go first, then the least
  recently used answers of the tenant that holds the most bytes: a tenant that floods
  the cache evicts its own answers, never another's while it holds more than they do.
- idempotency records, ``idempotency_max_bytes``: never evicted before they expire. A
  new claim that does not fit, or would take its tenant past ``idempotency_tenant_share``
  of the budget, raises ``RecordsFull`` (the create is refused with 503, never silently
  left without deduplication). An update of a claimed record (its answer) always fits.
- ownership records, ``ownership_max_bytes``: least recently used beyond it.
- deletion tombstones: a small LRU of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from cachetools import TLRUCache

from .base import COMPLETED, DELETED, IDEMPOTENCY, OWNERSHIP, Entry, RecordsFull, record_tenant

RECORD_OVERHEAD = 120  # bytes of bookkeeping per record (key, tuple, LRU links)
TOMBSTONE_BYTES = 1024 * 1024


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


def key_tenant(key: str) -> str:
    """The tenant of a cache key: its last field (``family|id|fingerprint[?query]``)."""
    return key.rpartition("|")[2]


class _PerTenant:
    """One TLRU cache per tenant; the sum of their sizes is the kind's usage."""

    def __init__(
        self,
        max_bytes: int,
        clock: Callable[[], float],
        on_evict: Callable[[], None],
        ttu: Callable[[str, Any, float], float],
        size: Callable[[Any], float],
        part_max: int | None = None,
    ) -> None:
        self.max = max_bytes
        self.parts: dict[str, _Cache] = {}
        limit = part_max or max_bytes

        def make() -> _Cache:
            return _Cache(limit, clock, on_evict, ttu, size)

        self._make = make
        self.evicted = 0

    def part(self, tenant: str, create: bool = False) -> _Cache | None:
        part = self.parts.get(tenant)
        if part is None and create:
            part = self.parts[tenant] = self._make()
        return part

    def used(self) -> float:
        return sum(part.currsize for part in self.parts.values())

    def expire(self) -> None:
        for tenant, part in list(self.parts.items()):
            part.expire()
            if not part:
                del self.parts[tenant]

    def evict_from_largest(self, room: int) -> None:
        """Pop least recently used items of the largest holder until ``room`` fits."""
        while self.parts and self.used() + room > self.max:
            tenant, part = max(self.parts.items(), key=lambda item: item[1].currsize)
            try:
                part.popitem()
                self.evicted += 1
            except KeyError:
                pass
            if not part:
                del self.parts[tenant]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())


class MemoryStore:
    name = "memory"

    def __init__(
        self,
        max_bytes: int,
        clock: Callable[[], float],
        on_evict: Callable[[], None] = lambda: None,
        *,
        idempotency_max_bytes: int = 64 * 1024 * 1024,
        ownership_max_bytes: int = 32 * 1024 * 1024,
        tenant_share: float = 0.25,
    ) -> None:
        self._max = max_bytes
        self._clock = clock
        self._on_evict = on_evict
        self._answers = _PerTenant(max_bytes, clock, on_evict, _entry_deadline, _entry_size)
        self._idempotency = _PerTenant(
            idempotency_max_bytes,
            clock,
            on_evict,
            _record_deadline,
            _record_size,
            part_max=2 * idempotency_max_bytes,  # updates never evict a part's own records
        )
        self._tenant_idempotency_max = int(idempotency_max_bytes * tenant_share)
        self._ownership = _Cache(
            ownership_max_bytes, clock, on_evict, _record_deadline, _record_size
        )
        self._deleted = _Cache(TOMBSTONE_BYTES, clock, on_evict, _record_deadline, _record_size)

    @property
    def evictions(self) -> int:
        return self._answers.evicted + self._ownership.evictions + self._deleted.evictions

    def get_nowait(self, key: str) -> Entry | None:
        part = self._answers.parts.get(key.rpartition("|")[2])
        if part is None:
            return None
        entry: Entry | None = part.get(key)
        return entry

    async def get(self, key: str) -> Entry | None:
        return self.get_nowait(key)

    async def put(self, key: str, entry: Entry) -> None:
        answers = self._answers
        size = entry.size
        if size > self._max:
            return  # larger than the whole cache
        tenant = key_tenant(key)
        part = answers.part(tenant, create=True)
        assert part is not None
        part.pop(key, None)  # a refresh: its old bytes are not in the way
        if answers.used() + size > self._max:
            answers.expire()
            answers.evict_from_largest(size)
            part = answers.part(tenant, create=True)
            assert part is not None
        with contextlib.suppress(ValueError):
            part[key] = entry

    async def delete_video(self, video_id: str) -> int:
        # Deletes are rare; a scan keeps the store free of a second index to maintain.
        count = 0
        for part in list(self._answers.parts.values()):
            doomed = [k for k, e in list(part.items()) if e.video_id == video_id]
            for key in doomed:
                part.pop(key, None)
            count += len(doomed)
        return count

    async def clear(self) -> int:
        """Drop the cached answers (records are not a cache: they stay)."""
        count = len(self._answers)
        self._answers.parts.clear()
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
        return len(self._answers), int(self._answers.used())

    def tenant_stats(self) -> dict[str, int]:
        """Bytes of answers held per tenant (for tests and the operator)."""
        return {t: int(p.currsize) for t, p in self._answers.parts.items()}

    async def refresh_stats(self) -> None:
        self._answers.expire()
        self._idempotency.expire()
        self._ownership.expire()
        self._deleted.expire()

    # -- records (idempotency, ownership, tombstones) ------------------------------------
    def _simple_tier(self, name: str) -> _Cache | None:
        if name.startswith((OWNERSHIP, COMPLETED)):  # per-job facts: one LRU budget
            return self._ownership
        if name.startswith(DELETED):
            return self._deleted
        if name.startswith(IDEMPOTENCY):
            return None
        raise ValueError(f"unknown record kind: {name[:8]!r}")

    def _get_record(self, name: str) -> Record | None:
        tier = self._simple_tier(name)
        if tier is None:
            tier = self._idempotency.part(record_tenant(name))
        return tier.get(name) if tier is not None else None

    async def get_records(self, names: list[str]) -> list[bytes | None]:
        found = [self._get_record(name) for name in names]
        return [record[0] if record is not None else None for record in found]

    async def put_record(
        self, name: str, value: bytes, ttl: float, *, only_new: bool = False
    ) -> bool:
        if only_new and self._get_record(name) is not None:
            return False
        record = (value, self._clock() + ttl)
        if ttl <= 0:
            return False
        tier = self._simple_tier(name)
        if tier is None:
            self._put_idempotency(name, record, claim=only_new)
            return True
        tier.pop(name, None)
        try:
            tier[name] = record  # LRU within its own budget
        except ValueError:  # larger than the whole tier
            return False
        return True

    def _put_idempotency(self, name: str, record: Record, *, claim: bool) -> None:
        records = self._idempotency
        tenant = record_tenant(name)
        part = records.part(tenant, create=True)
        assert part is not None
        part.pop(name, None)
        size = _record_size(record)
        if claim:  # a new key: it must fit without evicting any live record
            if records.used() + size > records.max or part.currsize + size > (
                self._tenant_idempotency_max
            ):
                records.expire()
                part = records.part(tenant, create=True)
                assert part is not None
            if part.currsize + size > self._tenant_idempotency_max:
                raise RecordsFull("this tenant's share of idempotency records is used up")
            if records.used() + size > records.max:
                raise RecordsFull("the idempotency record store is full")
        part[name] = record

    async def delete_record(self, name: str) -> None:
        tier = self._simple_tier(name)
        if tier is None:
            tier = self._idempotency.part(record_tenant(name))
        if tier is not None:
            tier.pop(name, None)

    def record_stats(self) -> tuple[int, int]:
        """(records, bytes) of idempotency and ownership records held."""
        count = len(self._idempotency) + len(self._ownership)
        return count, int(self._idempotency.used() + self._ownership.currsize)

"""Records the shared store could not take when they were made (Redis down or slow):
held in this process, bounded, and written as soon as the store answers again, so a job
created during an outage still gets its owner recorded, and its idempotent answer is
replayed by every replica afterwards."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from .cache.base import RecordsFull, RecordStore, RecordsUnavailable

log = logging.getLogger("proxy.records")
BACKLOG_MAX = 100_000


class Backlog:
    def __init__(self, max_items: int = BACKLOG_MAX) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def add(self, name: str, value: bytes, deadline: float) -> None:
        self._items.pop(name, None)
        self._items[name] = (value, deadline)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
            log.warning("record backlog full: the oldest unwritten record is dropped")

    def get(self, name: str, now: float) -> bytes | None:
        item = self._items.get(name)
        return item[0] if item is not None and now < item[1] else None

    def discard(self, name: str) -> None:
        self._items.pop(name, None)

    def __len__(self) -> int:
        return len(self._items)

    async def flush(self, store: RecordStore, clock: Callable[[], float]) -> int:
        """Write what is held, oldest first, until the store fails again; the count."""
        written = 0
        for name, (value, deadline) in list(self._items.items()):
            ttl = deadline - clock()
            try:
                if ttl > 0:
                    await store.put_record(name, value, ttl)
            except RecordsUnavailable:
                break  # still down: try again on the next flush
            except RecordsFull:
                log.warning("a held record does not fit the store: dropped")
            self._items.pop(name, None)
            written += 1
        return written

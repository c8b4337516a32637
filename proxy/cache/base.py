"""What a cache entry is, and the small interface both stores implement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from ..policy import EntryKind

# Record names start with their kind (the memory store keeps each kind in its own tier).
IDEMPOTENCY = "idem:"  # idem:<tenant fingerprint>:<hash of secret, tenant and key>
OWNERSHIP = "own:"  # own:<canonical id> = the owner's principal
DELETED = "gone:"  # gone:<canonical id>: deleted through the proxy (no stale answers)
COMPLETED = "done:"  # done:<canonical id>: seen completed (the content store may fill)


def record_tenant(name: str) -> str:
    """The tenant an idempotency record belongs to (its budget share is counted)."""
    return name.split(":", 2)[1] if name.count(":") >= 2 else ""


class RecordsUnavailable(Exception):
    """The shared store could not be asked about a record (Redis down or slow)."""


class RecordsFull(Exception):
    """A new record does not fit its budget (or its tenant's share of it): refused,
    never made room for by dropping a live record."""


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Entry:
    """A stored retrieve answer, with the bytes to send precomputed at store time."""

    video_id: str  # canonical id, for invalidation
    kind: EntryKind
    status: int
    headers: list[tuple[bytes, bytes]]  # upstream answer headers, ready to send
    body: bytes  # for TERMINAL: the upstream body plus extra_fields.cache_debug
    stored_at: float
    deadline: float

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 256

    def dumps(self) -> bytes:
        meta = {
            "v": self.video_id, "k": self.kind.value, "s": self.status,
            "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "t": self.stored_at, "d": self.deadline,
        }  # fmt: skip
        return orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        meta_raw, _, body = data.partition(b"\n")
        meta = orjson.loads(meta_raw)
        return cls(
            video_id=meta["v"],
            kind=EntryKind(meta["k"]),
            status=meta["s"],
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]],
            body=body,
            stored_at=meta["t"],
            deadline=meta["d"],
        )


class RecordStore(Protocol):
    """Small values that are not a cache (idempotency, job ownership). Unlike cache
    reads, these raise RecordsUnavailable when the store cannot answer, so each caller
    chooses to fail open or closed. Both cache stores are record stores too."""

    async def get_records(self, names: list[str]) -> list[bytes | None]: ...

    async def put_record(
        self, name: str, value: bytes, ttl: float, *, only_new: bool = False
    ) -> bool:
        """Store a record for ``ttl`` seconds; with ``only_new``, only if absent
        (an atomic claim). True if stored."""
        ...

    async def delete_record(self, name: str) -> None: ...


class CacheStore(RecordStore, Protocol):
    """Both backends. Every method swallows its own backend failures: a broken cache
    behaves like an empty one, never like an error."""

    name: str

    def get_nowait(self, key: str) -> Entry | None:
        """An entry held in this process, without I/O (None for shared stores)."""
        ...

    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, entry: Entry) -> None: ...

    async def delete_video(self, video_id: str) -> int: ...

    async def clear(self) -> int: ...

    async def lock(self, key: str, seconds: float) -> bool:
        """Cross-replica single flight: True if this process should call upstream."""
        ...

    async def unlock(self, key: str) -> None: ...

    async def aclose(self) -> None: ...

    async def listen(self, on_key: Callable[[str], None]) -> None:
        """Call ``on_key`` for every key any replica stores, until cancelled (for
        waiting clients on other replicas); in-process stores return at once."""
        ...

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) this process reports: what its memory holds, or (Redis) the
        shared store's totals if this process is the one counting them, else zeros, so
        that the sum over every process is the store's total."""
        ...

    async def refresh_stats(self) -> None:
        """Bring ``stats`` up to date (drop expired entries; recount a shared store)."""
        ...

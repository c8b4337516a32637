"""State shared by the worker processes of one host: SQLite in the directory that
``--workers`` creates for metrics (and removes at exit). Job statuses (for exact
transition counts) and, with the memory backend, idempotency and ownership records.

The status tracker's shared get-and-set (``swap``), for the memory backend with several
workers, so each transition is counted once per host rather than once per worker. Only
status changes reach it (the tracker's in-process LRU filters repeats first), never the
hit path. One ``BEGIN IMMEDIATE`` transaction per change makes the read and the write
atomic across processes; the table is trimmed to ``max_rows`` (least recently seen
first), like the in-process LRU.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

from .cache.base import (
    COMPLETED,
    DELETED,
    OWNERSHIP,
    RecordsFull,
    RecordsUnavailable,
    record_tenant,
)

log = logging.getLogger("proxy.hoststate")
FILE_NAME = "statuses.sqlite"  # not *.db: prometheus-client reads those as metric files
TRIM_EVERY = 1000
KIND_IDEMPOTENCY, KIND_OWNERSHIP, KIND_DELETED = 0, 1, 2
TOMBSTONE_BYTES = 1024 * 1024


def connect(directory: str, *schema: str) -> sqlite3.Connection:
    """The host's database, with ``schema`` applied. Autocommit mode: transactions are
    begun explicitly."""
    db = sqlite3.connect(os.path.join(directory, FILE_NAME), timeout=5.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    db.execute("PRAGMA synchronous=OFF")  # a host's scratch state, gone at exit anyway
    for statement in schema:
        db.execute(statement)
    return db


class HostStatuses:
    def __init__(self, directory: str, max_rows: int = 100_000) -> None:
        self.max_rows = max_rows
        self._writes = 0
        self._db = connect(
            directory,
            "CREATE TABLE IF NOT EXISTS statuses "
            "(id TEXT PRIMARY KEY, status TEXT NOT NULL, seen INTEGER NOT NULL)",
            "CREATE INDEX IF NOT EXISTS statuses_seen ON statuses (seen)",
        )

    async def swap(self, video_id: str, status: str) -> str | None:
        """Record a job's status; the previous one any worker of this host recorded.

        Inline, not in a thread: a change costs one short local transaction, and
        changes are a few per job."""
        try:
            return self._swap(video_id, status)
        except sqlite3.Error as exc:
            log.warning("host status store failed (%s): counting from this worker's view", exc)
            return None

    def _swap(self, video_id: str, status: str) -> str | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT status FROM statuses WHERE id = ?", (video_id,)).fetchone()
            db.execute(
                "INSERT INTO statuses (id, status, seen) VALUES (?, ?, ?) ON CONFLICT (id) "
                "DO UPDATE SET status = excluded.status, seen = excluded.seen",
                (video_id, status, time.time_ns()),
            )
            self._writes += 1
            if self._writes % TRIM_EVERY == 0:
                self._trim()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return str(row[0]) if row is not None else None

    def _trim(self) -> None:
        (rows,) = self._db.execute("SELECT count(*) FROM statuses").fetchone()
        if rows > self.max_rows:
            self._db.execute(
                "DELETE FROM statuses WHERE id IN (SELECT id FROM statuses ORDER BY seen LIMIT ?)",
                (rows - self.max_rows,),
            )

    def rows(self) -> int:
        (rows,) = self._db.execute("SELECT count(*) FROM statuses").fetchone()
        return int(rows)

    def close(self) -> None:
        self._db.close()


class HostRecords:
    """Idempotency, ownership and tombstone records shared by the workers of one host
    (the memory backend's records when ``--workers`` > 1), in the same SQLite file.

    Budgeted like the memory store: idempotency records are never evicted before they
    expire (a claim that does not fit, or passes its tenant's share, raises
    RecordsFull); ownership and tombstone records are trimmed, least recently written
    first, past their own budget.
    """

    def __init__(
        self,
        directory: str,
        idempotency_max_bytes: int,
        ownership_max_bytes: int = 32 * 1024 * 1024,
        tenant_share: float = 0.25,
    ) -> None:
        self.idempotency_max = idempotency_max_bytes
        self.tenant_max = int(idempotency_max_bytes * tenant_share)
        self.ownership_max = ownership_max_bytes
        self._writes = 0
        self._db = connect(
            directory,
            "CREATE TABLE IF NOT EXISTS records (name TEXT PRIMARY KEY, value BLOB NOT NULL, "
            "deadline REAL NOT NULL, kind INTEGER NOT NULL, seen INTEGER NOT NULL, "
            "tenant TEXT NOT NULL DEFAULT '')",
            "CREATE INDEX IF NOT EXISTS records_seen ON records (kind, seen)",
            "CREATE INDEX IF NOT EXISTS records_tenant ON records (kind, tenant)",
        )

    async def get_records(self, names: list[str]) -> list[bytes | None]:
        if not names:
            return []
        marks = ",".join("?" * len(names))
        try:
            rows = self._db.execute(
                f"SELECT name, value FROM records WHERE name IN ({marks}) AND deadline > ?",
                (*names, time.time()),
            ).fetchall()
        except sqlite3.Error as exc:
            raise RecordsUnavailable(str(exc)) from None
        found = {name: bytes(value) for name, value in rows}
        return [found.get(name) for name in names]

    async def put_record(
        self, name: str, value: bytes, ttl: float, *, only_new: bool = False
    ) -> bool:
        if ttl <= 0:
            return False
        now = time.time()
        kind = KIND_IDEMPOTENCY
        if name.startswith((OWNERSHIP, COMPLETED)):  # per-job facts: one LRU budget
            kind = KIND_OWNERSHIP
        elif name.startswith(DELETED):
            kind = KIND_DELETED
        tenant = record_tenant(name) if kind == KIND_IDEMPOTENCY else ""
        sql = (
            "INSERT INTO records (name, value, deadline, kind, seen, tenant) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
            "deadline = excluded.deadline, seen = excluded.seen"
        )
        if only_new:  # an atomic claim: only over an absent or expired record
            sql += " WHERE records.deadline <= ?"
        params: tuple[object, ...] = (name, value, now + ttl, kind, time.time_ns(), tenant)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if only_new and kind == KIND_IDEMPOTENCY:
                    self._admit(tenant, len(value), now)
                changed = db.execute(sql, (*params, now) if only_new else params).rowcount
                self._writes += 1
                if self._writes % TRIM_EVERY == 0:
                    self._trim(now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise RecordsUnavailable(str(exc)) from None
        return bool(changed)

    def _admit(self, tenant: str, size: int, now: float) -> None:
        """A new idempotency claim must fit without evicting a live record."""
        db = self._db
        (total,) = db.execute(
            "SELECT coalesce(sum(length(value)), 0) FROM records WHERE kind = 0 AND deadline > ?",
            (now,),
        ).fetchone()
        if total + size > self.idempotency_max:
            raise RecordsFull("the idempotency record store is full")
        (mine,) = db.execute(
            "SELECT coalesce(sum(length(value)), 0) FROM records "
            "WHERE kind = 0 AND tenant = ? AND deadline > ?",
            (tenant, now),
        ).fetchone()
        if mine + size > self.tenant_max:
            raise RecordsFull("this tenant's share of idempotency records is used up")

    async def delete_record(self, name: str) -> None:
        try:
            self._db.execute("DELETE FROM records WHERE name = ?", (name,))
        except sqlite3.Error as exc:
            raise RecordsUnavailable(str(exc)) from None

    def _trim(self, now: float) -> None:
        db = self._db
        db.execute("DELETE FROM records WHERE deadline <= ?", (now,))
        for kind, budget in ((KIND_OWNERSHIP, self.ownership_max), (KIND_DELETED, TOMBSTONE_BYTES)):
            self._trim_kind(kind, budget)

    def _trim_kind(self, kind: int, budget: int) -> None:
        db = self._db
        (size,) = db.execute(
            "SELECT coalesce(sum(length(value) + length(name)), 0) FROM records WHERE kind = ?",
            (kind,),
        ).fetchone()
        excess = size - budget
        if excess > 0:
            # The oldest records of this kind whose sizes add up to the excess.
            db.execute(
                "DELETE FROM records WHERE name IN (SELECT name FROM (SELECT name, "
                "sum(length(value) + length(name)) OVER (ORDER BY seen ROWS UNBOUNDED "
                "PRECEDING) - length(value) - length(name) AS before FROM records "
                "WHERE kind = ?) WHERE before < ?)",
                (kind, excess),
            )

    def size(self) -> int:
        (size,) = self._db.execute("SELECT coalesce(sum(length(value)), 0) FROM records").fetchone()
        return int(size)

    def close(self) -> None:
        self._db.close()

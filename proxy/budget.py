"""Budget guard (issue 24, part 1): per-tenant limits on running video jobs and on the
seconds of video generated in a sliding window, checked before any create, remix or
edit reaches the upstream.

A job counts from its create until the proxy sees it terminal (any poll, watcher or
webhook follow through it), until it is deleted through the proxy, or until
``running_job_max_seconds``. Its seconds count for ``budget_window_seconds`` and are
given back when the upstream refuses the create or the job fails (failures are priced at
zero); a DELETE gives nothing back. The tenant is the ownership principal.

Storage: SQLite, in memory for one process, or the host's file shared by ``--workers``
(one ``BEGIN IMMEDIATE`` transaction per check-and-reserve: exact across workers). Not
yet: Redis (replicas each count on their own host), background follows of jobs nobody
polls (they end at ``running_job_max_seconds``), per-tenant overrides, cost metrics.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .errors import NotSent
from .settings import Settings

log = logging.getLogger("proxy.budget")
FILE_NAME = "budget.sqlite"  # in the --workers directory (not *.db: prometheus reads those)
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS running (token TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
    "job TEXT, until REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS running_tenant ON running (tenant)",
    "CREATE INDEX IF NOT EXISTS running_job ON running (job)",
    "CREATE TABLE IF NOT EXISTS spent (token TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
    "job TEXT, at REAL NOT NULL, seconds REAL NOT NULL, ended INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS spent_tenant ON spent (tenant, at)",
    "CREATE INDEX IF NOT EXISTS spent_job ON spent (job)",
)


@dataclass(frozen=True, slots=True)
class Reservation:
    token: str
    tenant: str
    running: int  # jobs running for the tenant, this one included
    spent: float  # seconds spent in the window, this one included


def requested_seconds(doc: dict[str, Any] | None, default: float) -> float:
    """The ``seconds`` a create asks for (a string on the wire), else the default."""
    value = doc.get("seconds") if doc is not None else None
    try:
        seconds = float(value) if isinstance(value, (str, int, float)) else default
    except ValueError:
        return default
    return seconds if math.isfinite(seconds) and seconds >= 0 else default


def rate_limited(message: str, retry_after: float) -> NotSent:
    return NotSent(429, message, headers={"retry-after": str(max(1, math.ceil(retry_after)))})


class BudgetGuard:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.max_running = settings.max_running_jobs_per_tenant
        self.max_seconds = settings.max_video_seconds_per_tenant
        self.window = settings.budget_window_seconds
        self.job_max = settings.running_job_max_seconds
        self.default_seconds = settings.default_video_seconds
        self.retry_running = settings.webhook_poll_seconds
        self.clock = clock
        self.enabled = self.max_running > 0 or self.max_seconds > 0
        self._db: sqlite3.Connection | None = None

    def open(self, directory: str | None) -> None:
        """In memory for one process, or the host's file for ``--workers``."""
        if not self.enabled:
            return
        path = os.path.join(directory, FILE_NAME) if directory else ":memory:"
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        if directory:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
        for statement in SCHEMA:
            db.execute(statement)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def reserve(self, tenant: str, doc: dict[str, Any] | None) -> Reservation | None:
        """Check the tenant's limits and reserve a job and its seconds; 429 if over."""
        if self._db is None:
            return None
        seconds = requested_seconds(doc, self.default_seconds) if self.max_seconds else 0.0
        token = secrets.token_hex(12)
        now = self.clock()

        def work(db: sqlite3.Connection) -> Reservation:
            db.execute("DELETE FROM running WHERE until <= ?", (now,))
            db.execute("DELETE FROM spent WHERE at <= ?", (now - self.window,))
            (running,) = db.execute(
                "SELECT count(*) FROM running WHERE tenant = ?", (tenant,)
            ).fetchone()
            (spent,) = db.execute(
                "SELECT coalesce(sum(seconds), 0) FROM spent WHERE tenant = ?", (tenant,)
            ).fetchone()
            if self.max_running and running >= self.max_running:
                metrics.BUDGET_REJECTIONS.labels("running_jobs").inc()
                raise rate_limited(
                    f"running video jobs limit reached: {running} of {self.max_running} "
                    "running for this tenant; retry when one ends",
                    self.retry_running,
                )
            if self.max_seconds and spent + seconds > self.max_seconds:
                metrics.BUDGET_REJECTIONS.labels("video_seconds").inc()
                raise rate_limited(
                    f"video seconds budget reached: {spent:g} of {self.max_seconds:g} "
                    f"seconds used in the last {self.window:g} s, {seconds:g} requested",
                    self._frees_in(db, tenant, spent + seconds - self.max_seconds, now),
                )
            if self.max_running:
                db.execute(
                    "INSERT INTO running (token, tenant, until) VALUES (?, ?, ?)",
                    (token, tenant, now + self.job_max),
                )
            if self.max_seconds:
                db.execute(
                    "INSERT INTO spent (token, tenant, at, seconds) VALUES (?, ?, ?, ?)",
                    (token, tenant, now, seconds),
                )
            return Reservation(token, tenant, running + 1, spent + seconds)

        result: Reservation = self._transaction(work)
        return result

    def _frees_in(self, db: sqlite3.Connection, tenant: str, excess: float, now: float) -> float:
        """Seconds until enough of the window's spending expires to fit the request."""
        freed = 0.0
        for at, seconds in db.execute(
            "SELECT at, seconds FROM spent WHERE tenant = ? ORDER BY at", (tenant,)
        ):
            freed += seconds
            if freed >= excess:
                return max(1.0, float(at) + self.window - now)
        return self.window

    def confirm(self, reservation: Reservation | None, job_id: str | None, answer: Any) -> None:
        """The create was accepted: bind the reservation to its job (and its seconds to
        the answer's own ``seconds`` when the request named none)."""
        if reservation is None or self._db is None or job_id is None:
            return
        seconds = requested_seconds(answer if isinstance(answer, dict) else None, -1.0)

        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE running SET job = ? WHERE token = ?", (job_id, reservation.token))
            db.execute("UPDATE spent SET job = ? WHERE token = ?", (job_id, reservation.token))
            if seconds >= 0:
                db.execute(
                    "UPDATE spent SET seconds = ? WHERE token = ?", (seconds, reservation.token)
                )

        self._transaction(work)

    def cancel(self, reservation: Reservation | None) -> None:
        """The upstream refused the create: nothing runs, nothing is spent."""
        if reservation is None or self._db is None:
            return
        self._transaction(
            lambda db: (
                db.execute("DELETE FROM running WHERE token = ?", (reservation.token,)),
                db.execute("DELETE FROM spent WHERE token = ?", (reservation.token,)),
            )
        )

    def ended(self, job_id: str, status: str, provider: str, job: dict[str, Any]) -> None:
        """A job was seen terminal: it runs no more; a failed one gives its seconds back.
        Its seconds (and ``usage.cost``) are counted once, by whoever ends it first."""
        if self._db is None:
            return

        def work(db: sqlite3.Connection) -> None:
            ran = db.execute("DELETE FROM running WHERE job = ?", (job_id,)).rowcount
            row = db.execute(
                "SELECT seconds FROM spent WHERE job = ? AND ended = 0", (job_id,)
            ).fetchone()
            db.execute("UPDATE spent SET ended = 1 WHERE job = ?", (job_id,))
            if status == "failed":
                db.execute("DELETE FROM spent WHERE job = ?", (job_id,))
            if not (ran or row):
                return  # not counted here, or already ended
            seconds = row[0] if row else requested_seconds(job, 0.0)
            metrics.VIDEO_SECONDS.labels(provider, status).inc(seconds)
            usage = job.get("usage")
            cost = usage.get("cost") if isinstance(usage, dict) else None
            if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
                metrics.VIDEO_COST.labels(provider).inc(cost)

        self._transaction(work)

    def deleted(self, job_id: str) -> None:
        """Deleted through the proxy: it runs no more (its seconds may have been billed)."""
        if self._db is not None:
            self._transaction(lambda db: db.execute("DELETE FROM running WHERE job = ?", (job_id,)))

    def headers(self, reservation: Reservation | None) -> list[tuple[bytes, bytes]]:
        """IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers, structured form):
        each configured limit's quota, and what remains after this request."""
        if reservation is None:
            return []
        policies, remaining = [], []
        if self.max_running:
            policies.append(f'"jobs";q={self.max_running}')
            remaining.append(f'"jobs";r={max(0, self.max_running - reservation.running)}')
        if self.max_seconds:
            policies.append(f'"video_seconds";q={self.max_seconds:g};w={self.window:g}')
            left = max(0.0, self.max_seconds - reservation.spent)
            remaining.append(f'"video_seconds";r={left:g}')
        return [
            (b"ratelimit-policy", ", ".join(policies).encode()),
            (b"ratelimit", ", ".join(remaining).encode()),
        ]

    def running_jobs(self) -> int:
        if self._db is None:
            return 0
        (count,) = self._db.execute(
            "SELECT count(*) FROM running WHERE until > ?", (self.clock(),)
        ).fetchone()
        return int(count)

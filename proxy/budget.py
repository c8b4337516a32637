"""Budget guard (issue 24, part 1): per-tenant limits on running video jobs and on the
seconds of video generated in a sliding window, checked before any create, remix or
edit reaches the upstream.

A job counts from its create until the proxy sees it terminal (any poll, watcher or
webhook follow through it), until it is deleted through the proxy, or until
``running_job_max_seconds``. Its seconds count for ``budget_window_seconds`` and are
given back when the upstream refuses the create or the job fails (failures are priced at
zero); a DELETE gives nothing back. The tenant is the ownership principal.

Storage: Redis with the Redis backend (one Lua script checks and reserves: exact across
replicas), else SQLite, in memory for one process or the host's file shared by
``--workers`` (one ``BEGIN IMMEDIATE`` transaction: exact across workers). Not yet:
background follows of jobs nobody polls (they end at ``running_job_max_seconds``),
per-tenant overrides, ``GET /admin/tenants``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics
from .errors import NotSent
from .policy import CREDENTIAL_HEADERS
from .settings import Settings

log = logging.getLogger("proxy.budget")
T = TypeVar("T")
BUDGET_TIMEOUT_SECONDS = 1.0
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
class Limits:
    running: int  # most running jobs; 0: no limit
    seconds: float  # most seconds per window; 0: no limit


@dataclass(frozen=True, slots=True)
class Reservation:
    token: str
    tenant: str
    running: int  # jobs running for the tenant, this one included
    spent: float  # seconds spent in the window, this one included
    limits: Limits


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
    """The limits, and the store that counts against them (``open`` picks it)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.max_running = settings.max_running_jobs_per_tenant
        self.max_seconds = settings.max_video_seconds_per_tenant
        self.window = settings.budget_window_seconds
        self.job_max = settings.running_job_max_seconds
        self.default_seconds = settings.default_video_seconds
        self.retry_running = settings.webhook_poll_seconds
        self.fail_open = settings.budget_fail_open
        # Longer than the cache's: a limit decided by a slow answer must not fail open.
        self.timeout = BUDGET_TIMEOUT_SECONDS
        self.clock = clock
        self.limits = Limits(self.max_running, self.max_seconds)
        self.tenant_header = settings.budget_tenant_header.lower().encode() or None
        # Per-tenant limits, by the tenant header's value or a credential's SHA-256.
        self.overrides = {
            key: Limits(
                int(spec.get("max_running_jobs", self.max_running)),
                float(spec.get("max_video_seconds", self.max_seconds)),
            )
            for key, spec in settings.budget_overrides.items()
        }
        self.enabled = self.max_running > 0 or self.max_seconds > 0 or bool(self.overrides)
        self.store: SqlBudget | RedisBudget | None = None
        self._followers: set[asyncio.Task[None]] = set()

    def follow(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a counted job's follower (see ``endpoints.jobs.follow_counted``)."""
        task = asyncio.ensure_future(work)
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    def following(self) -> int:
        return len(self._followers)

    async def aclose(self) -> None:
        for task in list(self._followers):
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)

    def open(self, directory: str | None, redis_url: str | None = None) -> None:
        """Redis (shared by replicas), else SQLite: in memory for one process, or the
        host's file for ``--workers``."""
        if not self.enabled:
            return
        if redis_url is None:
            self.store = SqlBudget(directory, self)
            return
        client = aioredis.Redis.from_url(
            redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
        )  # its own pool: the cache's 50 ms operation timeout is too short for a limit
        self.store = RedisBudget(client, self)

    async def close(self) -> None:
        if isinstance(self.store, SqlBudget):
            self.store.close()
        elif isinstance(self.store, RedisBudget):
            await self.store.redis.aclose()

    async def _call(self, op: str, work: Callable[[], Awaitable[T]], default: T) -> T:
        """A store operation; a store that cannot answer is logged and skipped."""
        try:
            return await asyncio.wait_for(work(), self.timeout)
        except (RedisError, OSError, TimeoutError, sqlite3.Error) as exc:
            log.warning("budget store %s failed (%s)", op, type(exc).__name__)
            return default

    def limits_for(self, headers: list[tuple[bytes, bytes]]) -> Limits:
        """The limits of the tenant asking: an override named by the tenant header's
        value, or by the SHA-256 (hex) of one of its credential values, else the
        defaults. Configuration only: a request can only pick an override it holds the
        credential or the header value of."""
        if not self.overrides:
            return self.limits
        for name, value in headers:
            if self.tenant_header is not None and name == self.tenant_header:
                found = self.overrides.get(value.decode("latin-1"))
                if found is not None:
                    return found
        for name, value in headers:
            if name in CREDENTIAL_HEADERS:
                found = self.overrides.get(hashlib.sha256(value).hexdigest())
                if found is not None:
                    return found
        return self.limits

    async def reserve(
        self, tenant: str, doc: dict[str, Any] | None, headers: list[tuple[bytes, bytes]]
    ) -> Reservation | None:
        """Check the tenant's limits and reserve a job and its seconds; 429 if over.
        If the store cannot answer: forwarded unchecked (``budget_fail_open``, counted)
        or 503."""
        limits = self.limits_for(headers)
        if self.store is None or not (limits.running or limits.seconds):
            return None
        seconds = requested_seconds(doc, self.default_seconds) if limits.seconds else 0.0
        store = self.store
        try:
            verdict = await asyncio.wait_for(
                store.reserve(tenant, secrets.token_hex(12), seconds, self.clock(), limits),
                self.timeout,
            )
        except (RedisError, OSError, TimeoutError, sqlite3.Error) as exc:
            log.warning("budget store unavailable (%s)", type(exc).__name__)
            if self.fail_open:
                metrics.BUDGET_UNCHECKED.inc()
                return None
            raise NotSent(
                503, "the budget cannot be checked right now; retry", headers={"retry-after": "1"}
            ) from None
        if isinstance(verdict, Reservation):
            return verdict
        limit, running, spent, retry = verdict
        metrics.BUDGET_REJECTIONS.labels(limit).inc()
        if limit == "running_jobs":
            raise rate_limited(
                f"running video jobs limit reached: {running} of {limits.running} "
                "running for this tenant; retry when one ends",
                self.retry_running,
            )
        raise rate_limited(
            f"video seconds budget reached: {spent:g} of {limits.seconds:g} seconds used "
            f"in the last {self.window:g} s, {seconds:g} requested",
            retry,
        )

    async def confirm(
        self, reservation: Reservation | None, job_id: str | None, answer: Any
    ) -> None:
        """The create was accepted: bind the reservation to its job (and its seconds to
        the answer's own ``seconds``)."""
        if reservation is None or self.store is None or job_id is None:
            return
        seconds = requested_seconds(answer if isinstance(answer, dict) else None, -1.0)
        store = self.store
        await self._call("confirm", lambda: store.confirm(reservation, job_id, seconds), None)

    async def cancel(self, reservation: Reservation | None) -> None:
        """The upstream refused the create: nothing runs, nothing is spent."""
        if reservation is not None and self.store is not None:
            store = self.store
            await self._call("cancel", lambda: store.cancel(reservation), None)

    async def ended(self, job_id: str, status: str, provider: str, job: dict[str, Any]) -> None:
        """A job was seen terminal: it runs no more; a failed one gives its seconds back.
        Its seconds (and ``usage.cost``) are counted once, by whoever ends it first."""
        if self.store is None:
            return
        store = self.store
        found = await self._call("ended", lambda: store.ended(job_id, status == "failed"), None)
        if found is None:
            return
        seconds = found if found >= 0 else requested_seconds(job, 0.0)
        metrics.VIDEO_SECONDS.labels(provider, status).inc(seconds)
        usage = job.get("usage")
        cost = usage.get("cost") if isinstance(usage, dict) else None
        if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
            metrics.VIDEO_COST.labels(provider).inc(cost)

    async def deleted(self, job_id: str) -> None:
        """Deleted through the proxy: it runs no more (its seconds may have been billed)."""
        if self.store is not None:
            store = self.store
            await self._call("deleted", lambda: store.deleted(job_id), None)

    async def top_tenants(self, most: int = 20) -> list[dict[str, Any]]:
        """The tenants with the most running jobs (fingerprints, never credentials)."""
        if self.store is None:
            return []
        store = self.store
        nothing: list[tuple[str, int]] = []
        found = await self._call("top", lambda: store.top(self.clock(), most), nothing)
        return [{"tenant": t, "running_jobs": n} for t, n in found]

    async def running_jobs(self) -> int:
        if self.store is None:
            return 0
        store = self.store
        return await self._call("count", lambda: store.running_jobs(self.clock()), 0)

    def headers(self, reservation: Reservation | None) -> list[tuple[bytes, bytes]]:
        """IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers, structured form):
        each configured limit's quota, and what remains after this request."""
        if reservation is None:
            return []
        policies, remaining = [], []
        limits = reservation.limits
        if limits.running:
            policies.append(f'"jobs";q={limits.running}')
            remaining.append(f'"jobs";r={max(0, limits.running - reservation.running)}')
        if limits.seconds:
            policies.append(f'"video_seconds";q={limits.seconds:g};w={self.window:g}')
            left = max(0.0, limits.seconds - reservation.spent)
            remaining.append(f'"video_seconds";r={left:g}')
        return [
            (b"ratelimit-policy", ", ".join(policies).encode()),
            (b"ratelimit", ", ".join(remaining).encode()),
        ]


Verdict = Reservation | tuple[str, int, float, float]  # or (limit, running, spent, retry)


class SqlBudget:
    """The counts in SQLite; each operation one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, directory: str | None, guard: BudgetGuard) -> None:
        self.guard = guard
        path = os.path.join(directory, FILE_NAME) if directory else ":memory:"
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        if directory:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
        for statement in SCHEMA:
            db.execute(statement)
        self._db = db

    def close(self) -> None:
        self._db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    async def reserve(
        self, tenant: str, token: str, seconds: float, now: float, limits: Limits
    ) -> Verdict:
        g = self.guard

        def work(db: sqlite3.Connection) -> Verdict:
            db.execute("DELETE FROM running WHERE until <= ?", (now,))
            db.execute("DELETE FROM spent WHERE at <= ?", (now - g.window,))
            (running,) = db.execute(
                "SELECT count(*) FROM running WHERE tenant = ?", (tenant,)
            ).fetchone()
            (spent,) = db.execute(
                "SELECT coalesce(sum(seconds), 0) FROM spent WHERE tenant = ?", (tenant,)
            ).fetchone()
            if limits.running and running >= limits.running:
                return ("running_jobs", running, spent, g.retry_running)
            if limits.seconds and spent + seconds > limits.seconds:
                excess = spent + seconds - limits.seconds
                freed, retry = 0.0, g.window
                for at, amount in db.execute(
                    "SELECT at, seconds FROM spent WHERE tenant = ? ORDER BY at", (tenant,)
                ):
                    freed += amount
                    if freed >= excess:
                        retry = max(1.0, float(at) + g.window - now)
                        break
                return ("video_seconds", running, spent, retry)
            if limits.running:
                db.execute(
                    "INSERT INTO running (token, tenant, until) VALUES (?, ?, ?)",
                    (token, tenant, now + g.job_max),
                )
            if limits.seconds:
                db.execute(
                    "INSERT INTO spent (token, tenant, at, seconds) VALUES (?, ?, ?, ?)",
                    (token, tenant, now, seconds),
                )
            return Reservation(token, tenant, running + 1, spent + seconds, limits)

        verdict: Verdict = self._transaction(work)
        return verdict

    async def confirm(self, reservation: Reservation, job_id: str, seconds: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE running SET job = ? WHERE token = ?", (job_id, reservation.token))
            db.execute("UPDATE spent SET job = ? WHERE token = ?", (job_id, reservation.token))
            if seconds >= 0:
                db.execute(
                    "UPDATE spent SET seconds = ? WHERE token = ?", (seconds, reservation.token)
                )

        self._transaction(work)

    async def cancel(self, reservation: Reservation) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM running WHERE token = ?", (reservation.token,))
            db.execute("DELETE FROM spent WHERE token = ?", (reservation.token,))

        self._transaction(work)

    async def ended(self, job_id: str, failed: bool) -> float | None:
        """The job's seconds (-1: unknown) if this call ended it, else None."""

        def work(db: sqlite3.Connection) -> float | None:
            ran = db.execute("DELETE FROM running WHERE job = ?", (job_id,)).rowcount
            row = db.execute(
                "SELECT seconds FROM spent WHERE job = ? AND ended = 0", (job_id,)
            ).fetchone()
            db.execute("UPDATE spent SET ended = 1 WHERE job = ?", (job_id,))
            if failed:
                db.execute("DELETE FROM spent WHERE job = ?", (job_id,))
            if not (ran or row):
                return None
            return float(row[0]) if row else -1.0

        result: float | None = self._transaction(work)
        return result

    async def deleted(self, job_id: str) -> None:
        self._transaction(lambda db: db.execute("DELETE FROM running WHERE job = ?", (job_id,)))

    async def top(self, now: float, most: int) -> list[tuple[str, int]]:
        rows = self._db.execute(
            "SELECT tenant, count(*) FROM running WHERE until > ? GROUP BY tenant "
            "ORDER BY count(*) DESC, tenant LIMIT ?",
            (now, most),
        ).fetchall()
        return [(str(t), int(n)) for t, n in rows]

    async def running_jobs(self, now: float) -> int:
        (count,) = self._db.execute(
            "SELECT count(*) FROM running WHERE until > ?", (now,)
        ).fetchone()
        return int(count)


PREFIX = "bvp:b:"
_RESERVE = """
local now, window, job_max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_running, max_seconds = tonumber(ARGV[4]), tonumber(ARGV[5])
local seconds, token = tonumber(ARGV[6]), ARGV[7]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)) do
  redis.call('HDEL', KEYS[3], t)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local running = redis.call('ZCARD', KEYS[1])
local spent = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do spent = spent + tonumber(v) end
if max_running > 0 and running >= max_running then
  return {'running_jobs', running, tostring(spent), '0'}
end
if max_seconds > 0 and spent + seconds > max_seconds then
  local excess, freed, retry = spent + seconds - max_seconds, 0, window
  local items = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #items, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], items[i]) or '0')
    if freed >= excess then retry = tonumber(items[i + 1]) + window - now; break end
  end
  return {'video_seconds', running, tostring(spent), tostring(retry)}
end
if max_running > 0 then
  redis.call('ZADD', KEYS[1], now + job_max, token)
  redis.call('PEXPIRE', KEYS[1], math.ceil(job_max * 1000))
end
if max_seconds > 0 then
  redis.call('ZADD', KEYS[2], now, token)
  redis.call('HSET', KEYS[3], token, tostring(seconds))
  redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000))
  redis.call('PEXPIRE', KEYS[3], math.ceil(window * 1000))
end
return {'ok', running + 1, tostring(spent + seconds), '0'}
"""
_ENDED = """
local bound = redis.call('GET', KEYS[1])
if not bound then return false end
local tenant, token = string.match(bound, '^(.-)|(.*)$')
redis.call('DEL', KEYS[1])
local run = ARGV[1] .. 'run:' .. tenant
local sec = ARGV[1] .. 'sec:' .. tenant
local secv = ARGV[1] .. 'secv:' .. tenant
redis.call('ZREM', run, token)
local seconds = redis.call('HGET', secv, token) or '-1'
if ARGV[2] == '1' then
  redis.call('ZREM', sec, token)
  redis.call('HDEL', secv, token)
end
return seconds
"""


class RedisBudget:
    """The counts in Redis, shared by replicas: one Lua script checks and reserves
    atomically, so replicas racing creates never let a tenant past its limit."""

    def __init__(self, redis: Any, guard: BudgetGuard) -> None:
        self.redis, self.guard = redis, guard

    @staticmethod
    def _keys(tenant: str) -> list[str]:
        return [f"{PREFIX}run:{tenant}", f"{PREFIX}sec:{tenant}", f"{PREFIX}secv:{tenant}"]

    async def reserve(
        self, tenant: str, token: str, seconds: float, now: float, limits: Limits
    ) -> Verdict:
        g = self.guard
        kind, running, spent, retry = await self.redis.eval(
            _RESERVE, 3, *self._keys(tenant), now, g.window, g.job_max, limits.running,
            limits.seconds, seconds, token,
        )  # fmt: skip
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "ok":
            return Reservation(token, tenant, int(running), float(spent), limits)
        return (kind, int(running), float(spent), max(1.0, float(retry)))

    async def confirm(self, reservation: Reservation, job_id: str, seconds: float) -> None:
        ttl = int(max(self.guard.job_max, self.guard.window) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}job:{job_id}", f"{reservation.tenant}|{reservation.token}", px=ttl)
            if seconds >= 0 and reservation.limits.seconds:
                pipe.hset(f"{PREFIX}secv:{reservation.tenant}", reservation.token, seconds)
            await pipe.execute()

    async def cancel(self, reservation: Reservation) -> None:
        run, sec, secv = self._keys(reservation.tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(run, reservation.token)
            pipe.zrem(sec, reservation.token)
            pipe.hdel(secv, reservation.token)
            await pipe.execute()

    async def ended(self, job_id: str, failed: bool) -> float | None:
        found = await self.redis.eval(
            _ENDED, 1, f"{PREFIX}job:{job_id}", PREFIX, "1" if failed else "0"
        )
        return None if found is None else float(found)

    async def deleted(self, job_id: str) -> None:
        bound = await self.redis.get(f"{PREFIX}job:{job_id}")
        if bound:
            tenant, _, token = bound.decode().partition("|")
            await self.redis.zrem(f"{PREFIX}run:{tenant}", token)

    async def top(self, now: float, most: int) -> list[tuple[str, int]]:
        counts = []
        async for name in self.redis.scan_iter(match=PREFIX + "run:*", count=500):
            running = int(await self.redis.zcount(name, f"({now}", "+inf"))
            key = name.decode() if isinstance(name, bytes) else name
            if running:
                counts.append((key.removeprefix(PREFIX + "run:"), running))
        return sorted(counts, key=lambda item: (-item[1], item[0]))[:most]

    async def running_jobs(self, now: float) -> int:
        total = 0
        async for name in self.redis.scan_iter(match=PREFIX + "run:*", count=500):
            total += int(await self.redis.zcount(name, f"({now}", "+inf"))
        return total

"""The shared store: Redis, for all workers and replicas.

Entries expire natively (PX = the entry's TTL). A short ``SET NX PX`` lock gives
cross-replica single flight. Every operation is bounded by ``redis_timeout_seconds``;
any failure makes the cache behave as empty for a moment (a small circuit breaker),
logs at most once per interval, and the client reconnects on its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .base import Entry, RecordsUnavailable

log = logging.getLogger("proxy.cache.redis")
T = TypeVar("T")
PREFIX = "bvp:"
BREAKER_SECONDS = 0.5
LOG_EVERY_SECONDS = 10.0
STATUS_TTL_SECONDS = 7 * 24 * 3600
# Every stored key is announced here, so watchers on other replicas wake at once.
CHANNEL = PREFIX + "stored"
LISTEN_RETRY_SECONDS = 1.0
RECORD_PREFIX = PREFIX + "r:"
# The shared cache gauges: one process counts (SCAN), under a lease it renews.
STATS_LEASE_SECONDS = 60.0
STATS_MIN_INTERVAL_SECONDS = 1.0
STATS_TIMEOUT = 5.0
_FAILED = object()


class RedisStore:
    name = "redis"

    def __init__(
        self,
        url: str,
        timeout: float,
        clock: Callable[[], float],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._timeout = timeout
        self._clock = clock
        self._on_error = on_error or (lambda op: None)
        self._down_until = 0.0
        self._last_log = 0.0
        self._locks: dict[str, str] = {}
        self._entries = 0
        self._bytes = 0
        self._counted_at = -STATS_MIN_INTERVAL_SECONDS
        self._token = secrets.token_hex(8)
        self.counting = False  # this process holds the counting lease (shared gauges)

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], default: T) -> T:
        if time.monotonic() < self._down_until:
            return default
        try:
            return await asyncio.wait_for(call(), self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + BREAKER_SECONDS
            self._on_error(op)
            now = time.monotonic()
            if now - self._last_log > LOG_EVERY_SECONDS:
                self._last_log = now
                log.warning(
                    "redis %s failed (%s): serving without the cache", op, type(exc).__name__
                )
            return default

    async def _strict(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """Like ``_run``, but a failure raises RecordsUnavailable instead of a default."""
        marker: Any = _FAILED
        result = await self._run(op, call, marker)
        if result is _FAILED:
            raise RecordsUnavailable(op)
        return result  # type: ignore[no-any-return]

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool, for other shared state (followed webhook jobs)."""
        return self._redis

    def get_nowait(self, key: str) -> Entry | None:
        return None

    async def get(self, key: str) -> Entry | None:
        raw: Any = await self._run("get", lambda: self._redis.get(PREFIX + "e:" + key), None)
        if raw is None:
            return None
        try:
            return Entry.loads(raw)
        except (ValueError, KeyError, TypeError):
            return None

    async def put(self, key: str, entry: Entry) -> None:
        ttl_ms = int((entry.deadline - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        index = PREFIX + "i:" + entry.video_id

        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(PREFIX + "e:" + key, entry.dumps(), px=ttl_ms)
                pipe.sadd(index, key)
                pipe.pexpire(index, ttl_ms, gt=True)
                pipe.pexpire(index, ttl_ms, nx=True)
                pipe.publish(CHANNEL, key)
                await pipe.execute()

        await self._run("set", write, None)

    async def delete_video(self, video_id: str) -> int:
        index = PREFIX + "i:" + video_id

        async def delete() -> int:
            keys = await self._redis.smembers(index)
            names = [PREFIX + "e:" + (k.decode() if isinstance(k, bytes) else k) for k in keys]
            return int(await self._redis.delete(*names, index)) if names else 0

        return await self._run("delete", delete, 0)

    async def clear(self) -> int:
        async def clear_all() -> int:
            count = 0
            async for name in self._redis.scan_iter(match=PREFIX + "*", count=500):
                if not name.startswith(RECORD_PREFIX.encode()):  # records are not a cache
                    count += int(await self._redis.delete(name))
            return count

        # Not bounded by the per-operation timeout: an operator's purge may take a while.
        try:
            return await clear_all()
        except (RedisError, OSError) as exc:
            self._on_error("clear")
            log.warning("redis clear failed: %s", type(exc).__name__)
            return 0

    async def lock(self, key: str, seconds: float) -> bool:
        token = secrets.token_hex(8)

        async def acquire() -> bool:
            name = PREFIX + "l:" + key
            return bool(await self._redis.set(name, token, nx=True, px=int(seconds * 1000)))

        # Redis unavailable: every replica fetches for itself.
        got = await self._run("lock", acquire, True)
        if got:
            self._locks[key] = token
        return bool(got)

    async def unlock(self, key: str) -> None:
        """Release this process's lock. Tried even while the breaker is open: a lock
        left behind would make every replica's next poll of the key wait out its TTL."""
        token = self._locks.pop(key, None)
        if token is None:
            return
        script = (
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end"
        )
        try:
            await asyncio.wait_for(
                self._redis.eval(script, 1, PREFIX + "l:" + key, token), self._timeout
            )
        except (RedisError, OSError, TimeoutError):
            self._on_error("unlock")  # it expires on its own (its TTL)

    async def swap_status(self, video_id: str, status: str) -> str | None:
        """Atomically record a job's status; the previous one (shared by replicas)."""

        async def swap() -> str | None:
            name = PREFIX + "s:" + video_id
            old = await self._redis.set(name, status, get=True, ex=STATUS_TTL_SECONDS)
            return old.decode() if isinstance(old, bytes) else None

        return await self._run("status", swap, None)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def listen(self, on_key: Callable[[str], None]) -> None:
        """Subscribe to the stored-keys channel; resubscribe after any failure."""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        on_key(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                log.debug("redis subscription lost (%s): resubscribing", type(exc).__name__)
                await asyncio.sleep(LISTEN_RETRY_SECONDS)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def get_records(self, names: list[str]) -> list[bytes | None]:
        if not names:
            return []
        keys = [RECORD_PREFIX + name for name in names]
        found: list[Any] = await self._strict("records", lambda: self._redis.mget(keys))
        return [value if isinstance(value, bytes) else None for value in found]

    async def put_record(
        self, name: str, value: bytes, ttl: float, *, only_new: bool = False
    ) -> bool:
        ttl_ms = int(ttl * 1000)
        if ttl_ms <= 0:
            return False

        async def write() -> bool:
            return bool(await self._redis.set(RECORD_PREFIX + name, value, px=ttl_ms, nx=only_new))

        return await self._strict("records", write)

    async def delete_record(self, name: str) -> None:
        await self._strict("records", lambda: self._redis.delete(RECORD_PREFIX + name))

    def stats(self) -> tuple[int, int]:
        return self._entries, self._bytes

    async def refresh_stats(self) -> None:
        """Count the shared store's entries and bytes, if this process holds the
        counting lease (one process across all replicas, renewed while it lives);
        every other process reports zeros, so summing every process's gauges gives
        the totals exactly once. At most once a second (scrapes also call this)."""
        now = time.monotonic()
        if now - self._counted_at < STATS_MIN_INTERVAL_SECONDS:
            return
        self._counted_at = now
        self.counting = bool(await self._run("stats", self._lead, False))
        if not self.counting:
            self._entries = self._bytes = 0
            return
        try:
            self._entries, self._bytes = await asyncio.wait_for(self._count(), STATS_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            self._on_error("stats")
            log.debug("redis stats count failed (%s)", type(exc).__name__)

    async def _lead(self) -> bool:
        script = (
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) end "
            "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
            "return 0"
        )
        lease_ms = str(int(STATS_LEASE_SECONDS * 1000))
        won = await self._redis.eval(script, 1, PREFIX + "stats-lease", self._token, lease_ms)
        return bool(won)

    async def _count(self) -> tuple[int, int]:
        entries = size = 0
        batch: list[bytes] = []

        async def flush() -> int:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in batch:
                    pipe.strlen(name)
                lengths = await pipe.execute()
            batch.clear()
            return sum(int(n) for n in lengths)

        async for name in self._redis.scan_iter(match=PREFIX + "e:*", count=1000):
            entries += 1
            batch.append(name)
            if len(batch) >= 500:
                size += await flush()
        if batch:
            size += await flush()
        return entries, size

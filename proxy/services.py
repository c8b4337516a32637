"""The shared services of one proxy: plain objects opened and closed by the lifespan,
reached by endpoints through ``request.app.state.services`` and given to the
middleware explicitly. Nothing here is a module global."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from . import logs, metrics
from .bodies import BodyLimits
from .budget import BudgetGuard
from .cache import CacheStore, MemoryStore, create_store
from .coalesce import SingleFlight
from .content.store import ContentStore
from .contract import Drift
from .exchange import Reply
from .follows import MemoryFollows, RedisFollows, Sealer
from .gctune import SettledCollector
from .hoststate import HostRecords, HostStatuses
from .hotpath import HitMemo, hit_row
from .idempotency import Idempotency
from .ids import IdRules
from .ownership import Ownership
from .policy import CacheLimits
from .settings import Settings
from .stale import StaleSnapshots
from .transitions import StatusTracker
from .upstream import Upstream
from .watch import Watchers
from .webhooks import Webhooks

log = logging.getLogger("proxy")
FLUSH_SECONDS = 1.0
STATS_EVERY_TICKS = 15  # the cache gauges are refreshed every 15 flushes


class Services:
    """Settings-derived rules plus the pools; ``upstream`` and ``cache`` exist while
    ``running()`` is entered (the lifespan)."""

    upstream: Upstream
    cache: CacheStore
    loop: asyncio.AbstractEventLoop
    access_writer: logs.AccessWriter
    front: Any = None  # the front dispatch (front.FrontDispatch), set by create_app

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rules: IdRules = settings.id_rules()
        self.clock = clock
        self.transport = transport
        self.secret = settings.effective_cache_key_secret()
        self.limits = CacheLimits(
            terminal_ttl_seconds=settings.terminal_ttl_seconds,
            max_ttl_seconds=settings.max_ttl_seconds,
            poll_coalesce_seconds=settings.poll_coalesce_seconds,
            max_entry_bytes=settings.cache_max_entry_bytes,
        )
        self.bodies = BodyLimits(settings.max_request_bytes, settings.client_body_timeout_seconds)
        self.owners = Ownership(settings, self.secret, self.rules)
        # A pending create holds its key a little longer than the upstream may take.
        self.idempotency = Idempotency(
            settings.idempotency_ttl_seconds,
            settings.upstream_timeout_seconds + 5,
            self.secret,
            MemoryStore(  # this process's records (see Idempotency)
                0,
                clock,
                idempotency_max_bytes=settings.idempotency_max_bytes,
                tenant_share=settings.idempotency_tenant_share,
            ),
            clock,
        )
        self.flights: SingleFlight[Reply] = SingleFlight()
        self.tracker = StatusTracker()
        # Waiting clients (long-poll, SSE) share one watcher per job and tenant.
        self.watchers = Watchers(
            settings.poll_coalesce_seconds or 1.0, settings.max_waiters, clock,
            settings.max_waiters_per_tenant,
        )  # fmt: skip
        self.stale = StaleSnapshots(settings.stale_if_error_seconds)
        self.webhooks = Webhooks(settings)
        self.drift = Drift()  # upstream answers that broke the documented shape
        self.budget = BudgetGuard(settings, clock)  # per-tenant running jobs and seconds
        self.content = ContentStore(settings, self.secret, clock)  # stored videos
        # Access lines are buffered and written in batches (every FLUSH_SECONDS and at
        # shutdown): the logging machinery per request cost ~10% of a pass-through.
        self.access_rows: list[dict[str, Any]] = []
        self.log_access = log.isEnabledFor(logging.INFO)
        self.hot = HitMemo(clock, self.owners.header, self.log_access)
        self.draining = False
        self.ready_cache: tuple[float, bool] = (0.0, False)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Services]:
        """Open the upstream pool and the cache; close them (after a flush) on exit."""
        self.loop = asyncio.get_running_loop()
        self.upstream = Upstream(self.settings, self.transport)
        self.cache = create_store(
            self.settings, self.clock, self.on_cache_error, metrics.CACHE_EVICTIONS.inc
        )
        self.hot.cache = self.cache
        # Several workers on the memory backend share job statuses and records through
        # the host (SQLite in the multiprocess directory); Redis shares them itself.
        multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        shared = self.cache.name == "redis" or not multiprocess_dir
        host = None if shared else HostStatuses(multiprocess_dir or "")
        records = (
            None
            if shared
            else HostRecords(
                multiprocess_dir or "",
                self.settings.idempotency_max_bytes,
                self.settings.ownership_max_bytes,
                self.settings.idempotency_tenant_share,
            )
        )
        self.owners.store = self.idempotency.store = records or self.cache
        self.stale.records = self.owners.store
        self.content.records = self.owners.store
        self.content.open()
        if isinstance(self.owners.store, MemoryStore):  # one process: no second copy
            self.idempotency.local = self.owners.store
        swap = getattr(self.cache, "swap_status", None)
        self.tracker = StatusTracker(swap=swap or (host.swap if host else None))
        self.access_writer = logs.AccessWriter()
        flusher = asyncio.ensure_future(self._flush_loop())
        listener = asyncio.ensure_future(self.cache.listen(self.watchers.stored))
        redis = getattr(self.cache, "client", None)
        self.budget.open(
            multiprocess_dir, self.settings.redis_url if self.cache.name == "redis" else None
        )
        follows = RedisFollows(redis) if redis is not None else MemoryFollows()
        self.webhooks.start(follows, Sealer(self.secret, self.owners.header), self.poll_followed)
        collector = SettledCollector()
        collector.settle()  # start-up is over: see gctune
        try:
            yield self
        finally:
            collector.restore()
            flusher.cancel()
            listener.cancel()
            await self.watchers.aclose()
            await self.webhooks.aclose()
            await self.content.aclose()
            await self.budget.aclose()
            self.flush()
            self.access_writer.close()
            await self.upstream.aclose()
            await self.cache.aclose()
            if host is not None:
                host.close()
            if records is not None:
                records.close()
            await self.budget.close()

    async def _flush_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush_metrics()
            rows, self.access_rows = self.access_rows, []
            await self.access_writer.write(rows, dict)
            await self.access_writer.write_hits(self.hot.take_lines(), hit_row)
            try:  # records held while the shared store was down
                await self.owners.flush_backlog()
                await self.idempotency.flush_backlog()
            except Exception:
                log.exception("writing held records failed")
            ticks += 1
            if ticks % STATS_EVERY_TICKS == 0:
                await self.refresh_cache_stats()

    async def refresh_cache_stats(self) -> None:
        """Set the cache gauges (periodically, and before every scrape)."""
        await self.cache.refresh_stats()
        entries, size = self.cache.stats()
        metrics.CACHE_ENTRIES.set(entries)
        metrics.CACHE_BYTES.set(size)
        counting = getattr(self.cache, "counting", True)
        if self.budget.enabled:  # on Redis, one process across replicas counts (as above)
            metrics.RUNNING_JOBS.set(await self.budget.running_jobs() if counting else 0)
        await self.content.refresh_stats(counting)

    def flush_metrics(self) -> None:
        """Move fast-path hit counts into the metrics (periodically, before a scrape)."""
        self.hot.hits.flush()

    def flush(self) -> None:
        """Everything buffered, at once (shutdown)."""
        self.flush_metrics()
        rows, self.access_rows = self.access_rows, []
        self.access_writer.write_now(rows + [hit_row(line) for line in self.hot.take_lines()])

    def poll_followed(self, job: Any, headers: list[tuple[bytes, bytes]]) -> Any:
        """How the webhook follower polls a job (the retrieve endpoint's lookup)."""
        from .endpoints.jobs import poll_as_creator  # endpoints build on services

        return poll_as_creator(self, job, headers)

    def on_cache_error(self, op: str) -> None:
        """A cache backend operation failed."""
        metrics.CACHE_BACKEND_ERRORS.labels(self.settings.cache_backend, op).inc()

    def watch_sigterm(self) -> None:
        """Flag draining on SIGTERM, then let the server's own handler run."""
        previous = signal.getsignal(signal.SIGTERM)
        loop = self.loop

        def on_term(signum: int, frame: Any) -> None:
            self.draining = True
            loop.call_soon_threadsafe(self.watchers.release_all)
            if callable(previous):
                previous(signum, frame)

        # Only the main thread may set handlers (a test server in a thread may not).
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, on_term)

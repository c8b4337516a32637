"""One watcher per running job that clients wait on (long-poll, SSE).

A watcher is keyed like the cache (family, canonical id, tenant fingerprint), so
tenants never share one. While it has waiters it polls through the same single flight
and shared cache as plain polls, at most once per ``poll_coalesce_seconds`` (longer when
the upstream sends ``Retry-After``), and wakes every waiter when the job's status or
progress changes. It stops when the job is terminal, when its last waiter leaves, or at
shutdown. With the Redis backend every replica's watcher reads the shared cache first,
so the upstream still sees one poll per interval per job across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from . import metrics
from .errors import ProxyError
from .exchange import Reply
from .policy import TERMINAL
from .rewrite import parse_json_object
from .transitions import provider_label

log = logging.getLogger("proxy.watch")
Poll = Callable[[], Awaitable[Reply]]


def tenant_of(key: str) -> str:
    """The tenant fingerprint of a cache key (``family|id|fingerprint[?query]``)."""
    return key.rpartition("|")[2].partition("?")[0]


def job_state(reply: Reply) -> tuple[str, Any] | None:
    """(status, progress) of a 200 job answer; None for anything else."""
    if reply.status != 200:
        return None
    doc = parse_json_object(reply.body)
    if doc is None or not isinstance(doc.get("status"), str):
        return None
    return doc["status"], doc.get("progress")


def event_id(state: tuple[str, Any]) -> str:
    """A stable id for a job state: the same on every replica and every reconnect."""
    return hashlib.sha256(repr(state).encode()).hexdigest()[:16]


def retry_after(reply: Reply) -> float:
    for name, value in reply.headers:
        if name == b"retry-after" and value.strip().isdigit():
            return float(value)
    return 0.0


class Watch:
    """The latest snapshot of one job, and a way to wait for the next one."""

    def __init__(
        self, key: str, provider: str, poll: Poll, first: Reply, interval: float, now: float
    ) -> None:
        self.key, self.provider, self.poll, self.interval = key, provider, poll, interval
        self.snapshot = first
        self.fresh_until = now + interval
        self.state = job_state(first)
        self.waiters = 0
        self.closing = False  # shutting down: waiters get the latest snapshot now
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Future[None] | None = None

    @property
    def terminal(self) -> bool:
        return self.state is not None and self.state[0] in TERMINAL

    async def next_change(self, seen: tuple[str, Any] | None, timeout: float) -> None:
        """Return once the state differs from ``seen`` (or is terminal), or on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.state == seen and not self.terminal and not self.closing:
                    await self._changed.wait()

    async def until_terminal(self, timeout: float) -> None:
        """Return once the job is terminal (or the watch closes), or on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.terminal and not self.closing:
                    await self._changed.wait()

    def close(self) -> None:
        self.closing = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def publish(self, reply: Reply, now: float) -> None:
        state = job_state(reply)
        if state is None:
            return  # an error or odd answer: keep the last good snapshot
        self.snapshot = reply
        self.fresh_until = now + self.interval
        if state != self.state:
            self.state = state
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def refresh(self, clock: Callable[[], float]) -> None:
        """Poll now (once), outside the interval."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh(clock))

    async def _refresh(self, clock: Callable[[], float]) -> None:
        with contextlib.suppress(ProxyError):
            self.publish(await self.poll(), clock())

    async def run(self, clock: Callable[[], float]) -> None:
        delay = self.interval
        while self.waiters > 0 and not self.terminal:
            await asyncio.sleep(delay)
            delay = self.interval
            try:
                reply = await self.poll()
            except ProxyError:
                continue  # an upstream failure: try again next interval
            metrics.WATCH_POLLS.labels(provider_label(self.provider)).inc()
            delay = max(self.interval, retry_after(reply))
            self.publish(reply, clock())


class Watchers:
    """The running watchers of this process."""

    def __init__(
        self,
        interval: float,
        max_waiters: int,
        clock: Callable[[], float],
        max_per_tenant: int | None = None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.max_waiters = max_waiters
        self.max_per_tenant = max_per_tenant or max_waiters
        self._watches: dict[str, Watch] = {}
        self.waiters = 0
        self.by_tenant: Counter[str] = Counter()
        self.closing = False

    def full(self, key: str) -> bool:
        """No waiting slot for this key's tenant: past max_waiters, past the tenant's
        share (``max_waiters_per_tenant``), or shutting down."""
        return (
            self.closing
            or self.waiters >= self.max_waiters
            or self.by_tenant[tenant_of(key)] >= self.max_per_tenant
        )

    @contextlib.contextmanager
    def join(self, key: str, provider: str, poll: Poll, first: Reply, kind: str) -> Any:
        """Wait on the job under ``key`` for the block's duration."""
        watch = self._watches.get(key)
        if watch is None:
            watch = Watch(key, provider, poll, first, self.interval, self.clock())
            self._watches[key] = watch
        else:
            watch.publish(first, self.clock())
        watch.waiters += 1
        self.waiters += 1
        tenant = tenant_of(key)
        self.by_tenant[tenant] += 1
        gauge = metrics.WAITERS.labels(kind)
        gauge.inc()
        if watch.task is None or watch.task.done():
            watch.task = asyncio.ensure_future(self._run(watch))
        try:
            yield watch
        finally:
            gauge.dec()
            self.waiters -= 1
            self.by_tenant[tenant] -= 1
            if not self.by_tenant[tenant]:
                del self.by_tenant[tenant]
            watch.waiters -= 1
            if watch.waiters == 0:  # nobody waits: stop polling now, forget the job
                if watch.task is not None:
                    watch.task.cancel()
                if self._watches.get(key) is watch:
                    del self._watches[key]

    async def _run(self, watch: Watch) -> None:
        try:
            await watch.run(self.clock)
        except asyncio.CancelledError:
            pass
        except Exception:  # a watcher must never take a request down with it
            log.exception("watcher failed")

    def stored(self, key: str) -> None:
        """Another process stored a new answer under ``key``: waiters here need not
        wait for their own next poll (it reads that answer from the shared cache)."""
        watch = self._watches.get(key)
        if watch is not None and not watch.terminal:
            watch.refresh(self.clock)

    def fresh(self, key: str) -> Reply | None:
        """The snapshot of a running job watched here, if younger than one interval:
        clients that re-poll after each wake-up get it without asking the cache."""
        watch = self._watches.get(key)
        if watch is None or watch.terminal or self.clock() >= watch.fresh_until:
            return None
        return watch.snapshot

    def __len__(self) -> int:
        return len(self._watches)

    def release_all(self) -> None:
        """Shutting down: every waiter is answered now with what is known, so a
        graceful stop does not wait out long-polls and streams."""
        self.closing = True
        for watch in self._watches.values():
            watch.close()

    async def aclose(self) -> None:
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()

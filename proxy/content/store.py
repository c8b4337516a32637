"""The content store: which downloads may be stored, under which key, and the fills.

An object is keyed per (tenant, canonical id, variant): the tenant is the credential
fingerprint the retrieve cache uses, so one tenant's bytes are never another's, and
both families share an object. Names are keyed hashes (``<job>/<object>``): a job's
objects share the prefix, so a DELETE of the job removes every variant of every tenant.

A job is filled only once the proxy has seen it ``completed``: the first sight writes a
``done:`` record (shared like ownership records) with the object's expiry.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from .. import metrics
from ..cache.base import COMPLETED, RecordStore, RecordsUnavailable
from ..settings import Settings
from ..upstream import Upstream, UpstreamCall, UpstreamResponse
from .fills import Fill
from .objects import DiskObjects, ObjectMeta, Objects, S3Objects, Stored, StoreError
from .ranges import strong_etag

log = logging.getLogger("proxy.content")
# Upstream answer headers a stored object keeps (and serves) besides its length.
KEPT_HEADERS = ("content-type", "content-disposition", "content-language", "last-modified",
                "cache-control")  # fmt: skip
SWEEP_SECONDS = 60.0


def default_content_dir() -> str:
    """A per-user cache directory (XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "bifrost-video-proxy" / "content")


@dataclass(frozen=True, slots=True)
class Completion:
    completed_at: float
    expires: float


def storable_length(status: int, headers: list[tuple[bytes, bytes]]) -> int | None:
    """The length of an upstream answer that may be stored, or None (pure).

    Only a plain 200 of a declared length: never a refusal or "not ready", never an
    answer marked ``no-store``/``private`` or one setting a cookie, never an encoded
    or chunked body (its stored bytes would not be what the length says)."""
    if status != 200:
        return None
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        name = name.lower()
        if name in found and name == b"content-length" and found[name] != value:
            return None  # conflicting framing: not ours to guess
        found.setdefault(name, value)
    if b"set-cookie" in found or b"transfer-encoding" in found:
        return None
    control = found.get(b"cache-control", b"").lower()
    if b"no-store" in control or b"private" in control:
        return None
    if found.get(b"content-encoding", b"identity").strip().lower() != b"identity":
        return None
    length = found.get(b"content-length", b"").strip()
    return int(length) if length.isdigit() and len(length) <= 15 else None


class ContentStore:
    objects: Objects | None = None
    records: RecordStore  # set once the record store is open

    def __init__(self, settings: Settings, secret: bytes, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.mode = settings.content_cache
        self.enabled = self.mode != "off"
        self.secret = secret
        self.clock = clock
        self.max_fills = settings.content_max_fills
        self.fills: dict[str, Fill] = {}
        # Fills whose upstream answer has not come yet: later downloads wait for it.
        self.opening: dict[str, asyncio.Future[Fill | None]] = {}
        self._seen_completed: LRUCache[str, bool] = LRUCache(100_000)
        self._background: set[asyncio.Task[Any]] = set()
        self._swept = 0.0  # when expired objects were last dropped

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        if not self.enabled:
            return
        s = self.settings
        root = s.content_dir or default_content_dir()
        if self.mode == "s3":
            self.objects = S3Objects(
                s.content_s3_url, s.content_s3_endpoint, root, s.content_max_bytes,
                timeout=s.content_timeout_seconds,
            )  # fmt: skip
        else:
            self.objects = DiskObjects(root, s.content_max_bytes)

    async def aclose(self) -> None:
        for fill in list(self.fills.values()):
            if fill.task is not None:
                fill.task.cancel()
        for task in list(self._background):
            task.cancel()
        tasks = [f.task for f in self.fills.values() if f.task] + list(self._background)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.objects is not None:
            self.objects.close()

    # -- keys and records ----------------------------------------------------------------
    def _digest(self, *parts: str) -> str:
        return hmac.new(self.secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:40]

    def job_prefix(self, canonical_id: str) -> str:
        return self._digest("job", canonical_id)

    def key(self, principal: str, canonical_id: str, variant: str) -> str:
        return f"{self.job_prefix(canonical_id)}/{self._digest('object', principal, variant)}"

    def expiry(self, doc: dict[str, Any], now: float) -> Completion:
        """When a completed job's stored content goes (see ``content_retention_seconds``)."""
        s = self.settings
        completed = doc.get("completed_at")
        completed_at = float(completed) if isinstance(completed, (int, float)) else now
        if s.content_retention_seconds > 0:
            return Completion(completed_at, completed_at + s.content_retention_seconds)
        expires = doc.get("expires_at")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool):
            return Completion(completed_at, min(float(expires), now + s.max_ttl_seconds))
        return Completion(completed_at, now + min(s.terminal_ttl_seconds, s.max_ttl_seconds))

    async def saw_completed(self, canonical_id: str, doc: dict[str, Any]) -> bool:
        """Record that a job completed (once per process); True when newly recorded."""
        if not self.enabled or canonical_id in self._seen_completed:
            return False
        now = self.clock()
        done = self.expiry(doc, now)
        if done.expires <= now:
            return False
        value = json.dumps({"c": done.completed_at, "e": done.expires}).encode()
        try:
            await self.records.put_record(COMPLETED + canonical_id, value, done.expires - now)
        except Exception as exc:  # RecordsUnavailable, RecordsFull: filled another time
            log.warning("completion not recorded: %s", type(exc).__name__)
            return False
        self._seen_completed[canonical_id] = True
        return True

    async def completion(self, canonical_id: str) -> Completion | None:
        try:
            [raw] = await self.records.get_records([COMPLETED + canonical_id])
        except RecordsUnavailable:
            return None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return Completion(float(doc["c"]), float(doc["e"]))
        except (ValueError, KeyError, TypeError):
            return None

    # -- objects -------------------------------------------------------------------------
    async def lookup(self, key: str) -> Stored | None:
        """The stored object, or None; raises StoreError (counted)."""
        assert self.objects is not None
        try:
            return await self.objects.open(key, self.clock())
        except StoreError:
            metrics.CONTENT_STORE_ERRORS.labels("open").inc()
            raise

    def can_fill(self) -> bool:
        return len(self.fills) + len(self.opening) < self.max_fills

    async def running_fill(self, key: str) -> Fill | None:
        """The fill of ``key`` in this process, once its upstream answer is in."""
        fill = self.fills.get(key)
        if fill is not None:
            return fill
        opening = self.opening.get(key)
        return await asyncio.shield(opening) if opening is not None else None

    async def begin_fill(
        self,
        key: str,
        upstream: Upstream,
        call: UpstreamCall,
        etag_seed: tuple[str, str, Completion],
    ) -> tuple[Fill | None, UpstreamResponse]:
        """Open the upstream transfer for ``key``. Returns the running fill, or None with
        the open upstream answer when it is not to be stored (relay it as it is)."""
        opening: asyncio.Future[Fill | None] = asyncio.get_running_loop().create_future()
        self.opening[key] = opening
        fill = None
        try:
            response = await upstream.open(call)  # ProxyError: the caller's to answer
            fill = self._start(key, response, etag_seed)
            return fill, response
        finally:
            del self.opening[key]
            opening.set_result(fill)

    def _start(
        self, key: str, response: UpstreamResponse, etag_seed: tuple[str, str, Completion]
    ) -> Fill | None:
        assert self.objects is not None
        size = storable_length(response.status_code, response.raw_headers)
        if size is None:
            return None
        if not self.objects.reserve(size):
            return None  # larger than the store may hold: relayed unstored
        canonical_id, variant, done = etag_seed
        upstream_etag = response.header("etag")
        etag = (
            upstream_etag
            if upstream_etag and upstream_etag.startswith('"')
            else strong_etag(canonical_id, variant, size, done.completed_at)
        )
        kept = tuple(
            (name, value) for name in KEPT_HEADERS if (value := response.header(name)) is not None
        )
        meta = ObjectMeta(size, etag, done.expires, kept)
        try:
            spool = self.objects.spool(meta)
        except StoreError as exc:
            metrics.CONTENT_STORE_ERRORS.labels("fill").inc()
            log.warning("content store: %s; relayed instead", exc)
            return None
        fill = Fill(key, meta, spool)
        self.fills[key] = fill
        fill.task = asyncio.ensure_future(self._run(fill, response))
        return fill

    async def _run(self, fill: Fill, response: UpstreamResponse) -> None:
        objects = self.objects
        assert objects is not None
        try:
            await fill.run(response, lambda f: objects.commit(f.spool, f.key, f.meta))
        finally:
            self.fills.pop(fill.key, None)

    def in_background(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def forget(self, canonical_id: str) -> int:
        """Every stored object of a job (all variants, all tenants): removed."""
        self._seen_completed.pop(canonical_id, None)
        count = 0
        if self.objects is not None:
            try:
                count = await self.objects.delete_prefix(self.job_prefix(canonical_id))
            except StoreError as exc:
                metrics.CONTENT_STORE_ERRORS.labels("delete").inc()
                log.warning("content store: %s", exc)
        try:
            await self.records.delete_record(COMPLETED + canonical_id)
        except Exception:  # the objects are gone: a leftover record only allows a refill
            log.warning("completion record of a deleted job not removed")
        return count

    async def clear(self) -> int:
        if self.objects is None:
            return 0
        self._seen_completed.clear()
        try:
            return await self.objects.delete_prefix("")
        except StoreError as exc:
            metrics.CONTENT_STORE_ERRORS.labels("delete").inc()
            log.warning("content store: %s", exc)
            return 0

    async def refresh_stats(self, counting: bool = True) -> None:
        """The store gauges: one process per store reports them (the others report 0)."""
        if self.objects is None:
            return
        if isinstance(self.objects, S3Objects):
            self.objects.counting = counting
        try:
            now = time.monotonic()
            if now - self._swept >= SWEEP_SECONDS:  # not on every scrape: it reads every object
                self._swept = now
                await self.objects.sweep(self.clock())
            found = await self.objects.stats()
        except Exception as exc:
            metrics.CONTENT_STORE_ERRORS.labels("stats").inc()
            log.warning("content store stats failed: %s", type(exc).__name__)
            return
        objects, size = found if found is not None else (0, 0)
        metrics.CONTENT_STORE_OBJECTS.set(objects)
        metrics.CONTENT_STORE_BYTES.set(size)

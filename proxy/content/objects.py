"""Where stored videos live: a directory on local disk, or an S3 bucket.

Both backends store immutable objects under hashed names (``<job>/<object>``, each a
hex digest, never a path built from input), each with the metadata needed to serve it
(length, type, ETag, expiry) travelling *with* it, so that any worker or replica that
can read the object can serve it:

- disk: one file per object, a small header (magic, length, JSON) before the bytes, so
  an object and its metadata appear together with one ``rename`` (a reader never sees
  a partial object); least recently used objects are evicted to stay under
  ``content_max_bytes`` (temporary files included);
- S3: the bytes as the object, the metadata as its user metadata (``x-amz-meta-*``),
  through ``obstore`` (one async client for S3, GCS and Azure, streaming, ranged reads,
  multipart uploads from a file). On disk, plain ``pread`` in a thread is used instead of
  obstore's ``LocalStore``: measured 4 GB/s against its 0.4 GB/s, and LocalStore cannot
  keep metadata with an object.

A fill is first written to a *spool* file on local disk (``content_dir/spool``), read by
every download that shares it, then committed. Store failures raise ``StoreError``;
callers relay from the upstream instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import mmap
import os
import secrets
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cachetools import LRUCache

from .. import metrics

log = logging.getLogger("proxy.content")
MAGIC = b"BVP1"
_HEADER = struct.Struct(">4sI")
READ_CHUNK = 1024 * 1024
# A stored file is sent from mapped windows, in slices (measured against a direct
# nginx download of 256 MiB: 1 MiB slices 1.00, 4 MiB 1.07, 256 KiB 0.90).
WINDOW = 8 * READ_CHUNK
SEND_SLICE = 4 * READ_CHUNK
MAX_META_BYTES = 16 * 1024
S3_META_BYTES = 1800


class StoreError(Exception):
    """The store cannot be used right now (disk full or read-only, S3 down)."""


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What serving an object needs, known before its last byte arrived."""

    size: int
    etag: str
    expires: float  # epoch seconds; past it the object is gone
    headers: tuple[tuple[str, str], ...]  # content-type etc., as the upstream sent them

    def dumps(self) -> bytes:
        doc = {"size": self.size, "etag": self.etag, "expires": self.expires,
               "headers": [list(h) for h in self.headers]}  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode()  # ASCII (S3 metadata)

    @classmethod
    def loads(cls, raw: bytes | str) -> ObjectMeta:
        doc = json.loads(raw)
        return cls(
            int(doc["size"]), str(doc["etag"]), float(doc["expires"]),
            tuple((str(k), str(v)) for k, v in doc["headers"]),
        )  # fmt: skip

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class Stored(Protocol):
    """An object found in the store, ready to read."""

    meta: ObjectMeta

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)``; raises StoreError (before or while reading)."""
        yield b""  # pragma: no cover

    def close(self) -> None: ...


class Spool:
    """A fill's local file: written by the fill, read by every download sharing it."""

    def __init__(self, path: Path, header: bytes, size: int) -> None:
        self.path, self.offset, self.size = path, len(header), size
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create a spool file: {exc.strerror}") from None
        try:
            if header:
                os.pwrite(self.fd, header, 0)
            # The full length at once (sparse): the bound counts what this fill will
            # take, and the disk says "full" now rather than halfway.
            os.ftruncate(self.fd, self.offset + size)
        except OSError as exc:
            self.discard()
            raise StoreError(f"cannot size a spool file: {exc.strerror}") from None

    def write(self, position: int, data: bytes) -> None:
        """Synchronous: a page-cache write of one chunk is cheaper than a thread hop."""
        try:
            os.pwrite(self.fd, data, self.offset + position)
        except OSError as exc:
            raise StoreError(f"spool write failed: {exc.strerror}") from None

    async def read(self, position: int, count: int) -> bytes:
        return await asyncio.to_thread(os.pread, self.fd, count, self.offset + position)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            self.path.unlink()


class Objects(Protocol):
    name: str  # disk or s3

    async def open(self, key: str, now: float) -> Stored | None:
        """The live object under ``key``, or None (absent, expired, damaged)."""
        ...

    def spool(self, meta: ObjectMeta) -> Spool: ...

    def reserve(self, size: int) -> bool:
        """Room for ``size`` more bytes (evicting if this backend bounds itself)."""
        ...

    async def commit(self, spool: Spool, key: str, meta: ObjectMeta) -> None:
        """Make the spool's bytes the object under ``key`` (the spool stays readable:
        its owner discards it once no download reads it)."""
        ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def stats(self) -> tuple[int, int] | None:
        """(objects, bytes) if this process counts them (one per store), else None."""
        ...

    async def sweep(self, now: float) -> None:
        """Drop expired objects (and stray spool files) where the backend can."""
        ...

    def close(self) -> None: ...


def _leader_lock(path: Path) -> int | None:
    """One process per host holds this lock and reports the shared store's gauges."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class _Directory:
    """The local directory every backend keeps its spool (and disk objects) in."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.spool_dir = self.root / "spool"
        self._lock_fd: int | None = None
        try:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # ours alone
        except OSError as exc:
            log.warning("content directory unusable: %s", exc.strerror)

    def spool_file(self, meta: ObjectMeta, header: bytes) -> Spool:
        return Spool(self.spool_dir / (secrets.token_hex(16) + ".part"), header, meta.size)

    def leading(self) -> bool:
        if self._lock_fd is None:
            with contextlib.suppress(OSError):
                self._lock_fd = _leader_lock(self.root / ".stats.lock")
        return self._lock_fd is not None

    def spool_bytes(self) -> int:
        total = 0
        with contextlib.suppress(OSError), os.scandir(self.spool_dir) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
        return total

    def clear_stray_spools(self, older_than: float) -> None:
        """Spool files no fill holds any more (a killed process): removed."""
        with contextlib.suppress(OSError), os.scandir(self.spool_dir) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < time.time() - older_than:
                        os.unlink(entry.path)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _DiskStored:
    """A stored file, sent from memory-mapped windows: the bytes go from the page cache
    to the socket with one copy (``pread`` then ``send`` is two; measured 0.8 of a direct
    nginx ``sendfile`` download with pread, 1.0 with windows). Each window is mapped and
    its pages faulted in on a thread, the next while this one is sent, so the event loop
    never waits on the disk; at most two windows (16 MiB) are mapped at once."""

    def __init__(self, fd: int, offset: int, meta: ObjectMeta) -> None:
        self.fd, self.offset, self.meta = fd, offset, meta

    def _map(self, start: int, end: int) -> tuple[int, memoryview]:
        """The window holding object byte ``start`` (file offsets are page-aligned)."""
        first = (self.offset + start) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        length = min(WINDOW, self.offset + end - first)
        view = memoryview(mmap.mmap(self.fd, length, offset=first, access=mmap.ACCESS_READ))
        bytes(view[:: mmap.PAGESIZE])  # touch every page here, not on the event loop
        return first - self.offset, view

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self._map, start, end) if start < end else None
        position = start
        try:
            while pending is not None:
                try:
                    base, view = await pending
                except (OSError, ValueError) as exc:
                    raise StoreError(f"read failed: {exc}") from None
                stop = min(base + len(view), end)
                pending = loop.run_in_executor(None, self._map, stop, end) if stop < end else None
                while position < stop:
                    count = min(SEND_SLICE, stop - position)
                    yield view[position - base : position - base + count]  # type: ignore[misc]
                    position += count
                del view  # unmapped once the last slice is sent and dropped
        finally:
            if pending is not None:
                pending.cancel()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class DiskObjects(_Directory):
    """Objects as files under ``content_dir/objects``, LRU-bounded by ``max_bytes``."""

    name = "disk"

    def __init__(self, root: str, max_bytes: int) -> None:
        super().__init__(root)
        self.objects = self.root / "objects"
        self.max_bytes = max_bytes
        with contextlib.suppress(OSError):
            self.objects.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.objects / key

    async def open(self, key: str, now: float) -> Stored | None:
        return await asyncio.to_thread(self._open, key, now)

    def _open(self, key: str, now: float) -> Stored | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot open an object: {exc.strerror}") from None
        try:
            head = os.pread(fd, _HEADER.size + MAX_META_BYTES, 0)
            magic, length = _HEADER.unpack_from(head)
            if magic != MAGIC or length > MAX_META_BYTES:
                raise ValueError("not an object")
            meta = ObjectMeta.loads(head[_HEADER.size : _HEADER.size + length])
            offset = _HEADER.size + length
            if os.fstat(fd).st_size != offset + meta.size:
                raise ValueError("size does not match its record")
        except (ValueError, KeyError, TypeError, struct.error, OSError) as exc:
            os.close(fd)
            log.warning("stored object dropped: %s", exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if meta.expires <= now:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be evicted
        return _DiskStored(fd, offset, meta)

    def spool(self, meta: ObjectMeta) -> Spool:
        raw = meta.dumps()
        return self.spool_file(meta, _HEADER.pack(MAGIC, len(raw)) + raw)

    def _scan(self) -> list[tuple[float, int, str]]:
        found: list[tuple[float, int, str]] = []
        with contextlib.suppress(OSError), os.scandir(self.objects) as jobs:
            for job in jobs:
                with contextlib.suppress(OSError), os.scandir(job.path) as it:
                    for entry in it:
                        with contextlib.suppress(OSError):
                            st = entry.stat()
                            found.append((st.st_mtime, st.st_size, entry.path))
        return found

    def reserve(self, size: int) -> bool:
        if size + MAX_META_BYTES > self.max_bytes:
            return False  # larger than the bound: relayed unstored
        found = sorted(self._scan())
        total = sum(s for _, s, _ in found) + self.spool_bytes()
        for _, stored_size, path in found:
            if total + size + MAX_META_BYTES <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= stored_size
                metrics.CONTENT_EVICTIONS.inc()
        return total + size + MAX_META_BYTES <= self.max_bytes

    async def commit(self, spool: Spool, key: str, meta: ObjectMeta) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(spool.path, path)  # atomic: the whole object, or none
        except OSError as exc:
            spool.discard()
            raise StoreError(f"commit failed: {exc.strerror}") from None

    async def delete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self._delete_prefix, prefix)

    def _delete_prefix(self, prefix: str) -> int:
        count = 0
        roots = [self.objects / prefix] if prefix else list(self.objects.iterdir())
        for job in roots:
            with contextlib.suppress(OSError):
                for entry in job.iterdir():
                    with contextlib.suppress(OSError):
                        entry.unlink()
                        count += 1
                job.rmdir()
        return count

    async def stats(self) -> tuple[int, int] | None:
        if not self.leading():
            return None
        found = await asyncio.to_thread(self._scan)
        spooled = await asyncio.to_thread(self.spool_bytes)
        return len(found), sum(s for _, s, _ in found) + spooled

    async def sweep(self, now: float) -> None:
        if self.leading():
            await asyncio.to_thread(self._sweep, now)

    def _sweep(self, now: float) -> None:
        for _, _, path in self._scan():
            key = os.path.relpath(path, self.objects)
            stored = self._open(key, now)  # drops expired and damaged objects
            if stored is not None:
                stored.close()
        self.clear_stray_spools(older_than=24 * 3600)


class _S3Stored:
    def __init__(self, owner: S3Objects, key: str, meta: ObjectMeta) -> None:
        self.owner, self.key, self.meta = owner, key, meta

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        import obstore

        if start >= end:
            return
        try:
            result = await obstore.get_async(
                self.owner.store, self.key, options={"range": (start, end)}
            )
            if result.meta["size"] != self.meta.size:
                self.owner.known.pop(self.key, None)
                raise StoreError("object size does not match its record")
            async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                yield bytes(chunk)
        except FileNotFoundError:
            self.owner.known.pop(self.key, None)
            raise StoreError("object gone") from None
        except StoreError:
            raise
        except Exception as exc:  # obstore's errors: the store is unusable now
            raise StoreError(f"S3 read failed: {type(exc).__name__}") from None

    def close(self) -> None:
        pass


class S3Objects(_Directory):
    """Objects in an S3 (or S3-compatible) bucket; the bucket's lifecycle bounds it."""

    name = "s3"
    META = "proxy-meta"  # x-amz-meta-proxy-meta: ObjectMeta as JSON

    def __init__(
        self, url: str, endpoint: str, spool_root: str, spool_max_bytes: int,
        *, timeout: float = 30.0,
    ) -> None:  # fmt: skip
        from obstore.store import S3Store

        super().__init__(spool_root)
        parts = urlsplit(url)
        options: dict[str, Any] = {
            "timeout": timedelta(seconds=timeout),
            "connect_timeout": timedelta(seconds=2),
        }
        extra: dict[str, Any] = {}
        if endpoint:
            extra["endpoint"] = endpoint
            extra["virtual_hosted_style_request"] = False  # path-style for custom servers
            options["allow_http"] = endpoint.startswith("http://")
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            extra["region"] = "us-east-1"
        self.store = S3Store(
            parts.netloc,
            prefix=parts.path.strip("/") or None,
            client_options=options,  # type: ignore[arg-type]
            retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=3)},
            **extra,
        )
        self.spool_max_bytes = spool_max_bytes
        self.known: LRUCache[str, ObjectMeta] = LRUCache(4096)  # immutable once stored
        self.counting = True  # set by the owner: one process across replicas reports

    async def open(self, key: str, now: float) -> Stored | None:
        import obstore

        meta = self.known.get(key)
        if meta is None:
            try:
                result = await obstore.get_async(self.store, key, options={"head": True})
            except FileNotFoundError:
                return None
            except Exception as exc:
                raise StoreError(f"S3 lookup failed: {type(exc).__name__}") from None
            try:
                meta = ObjectMeta.loads(str(result.attributes.get(self.META, "")))
            except (ValueError, KeyError, TypeError):
                log.warning("stored object without usable metadata: dropped")
                await self._delete([key])
                return None
            if result.meta["size"] != meta.size:
                log.warning("stored object whose size does not match its record: dropped")
                await self._delete([key])
                return None
            self.known[key] = meta
        if meta.expires <= now:
            self.known.pop(key, None)
            await self._delete([key])
            return None
        return _S3Stored(self, key, meta)

    def spool(self, meta: ObjectMeta) -> Spool:
        return self.spool_file(meta, b"")

    def reserve(self, size: int) -> bool:
        return self.spool_bytes() + size <= self.spool_max_bytes

    async def commit(self, spool: Spool, key: str, meta: ObjectMeta) -> None:
        import obstore

        raw = meta.dumps()
        if len(raw) > S3_META_BYTES:  # S3 allows 2 KiB of user metadata: keep the type only
            kept = tuple((k, v) for k, v in meta.headers if k == "content-type")
            meta = ObjectMeta(meta.size, meta.etag, meta.expires, kept)
            raw = meta.dumps()
        attributes: dict[str, str] = {self.META: raw.decode()}
        ctype = meta.header("content-type")
        if ctype:
            attributes["Content-Type"] = ctype
        try:
            await obstore.put_async(self.store, key, spool.path, attributes=attributes)
        except Exception as exc:
            raise StoreError(f"S3 upload failed: {type(exc).__name__}") from None
        self.known[key] = meta

    async def _delete(self, keys: list[str]) -> None:
        import obstore

        with contextlib.suppress(Exception):
            await obstore.delete_async(self.store, keys)

    async def _keys(self, prefix: str) -> list[tuple[str, int]]:
        import obstore

        try:
            listed = await obstore.list(self.store, prefix or None).collect_async()
        except Exception as exc:
            raise StoreError(f"S3 list failed: {type(exc).__name__}") from None
        return [(item["path"], item["size"]) for item in listed]

    async def delete_prefix(self, prefix: str) -> int:
        keys = [k for k, _ in await self._keys(prefix + "/" if prefix else "")]
        for key in keys:
            self.known.pop(key, None)
        if keys:
            import obstore

            try:
                await obstore.delete_async(self.store, keys)
            except Exception as exc:
                raise StoreError(f"S3 delete failed: {type(exc).__name__}") from None
        return len(keys)

    async def stats(self) -> tuple[int, int] | None:
        if not (self.counting and self.leading()):
            return None
        listed = await self._keys("")
        return len(listed), sum(size for _, size in listed) + self.spool_bytes()

    async def sweep(self, now: float) -> None:
        # Expired objects go when next opened; the bucket's lifecycle rules bound the
        # rest (see docs/content.md). Only stray spool files are this process's to drop.
        if self.leading():
            await asyncio.to_thread(self.clear_stray_spools, 24 * 3600)

"""A fill: one upstream transfer of a video, written to a spool file while every download
of the same object reads from it, then committed to the store.

The fill is its own task: it goes on after the client that started it hangs up (a
player's ``bytes=0-1`` probe lasts milliseconds), and readers wait only for the bytes
they ask for. Only a transfer whose length matches its ``Content-Length`` is committed;
anything cut short, too long, or refused by the disk leaves no object behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from .. import metrics
from ..upstream import StreamBroken, UpstreamResponse
from .objects import READ_CHUNK, ObjectMeta, Spool, StoreError

log = logging.getLogger("proxy.content")


class FillBroken(Exception):
    """A reader needs bytes the fill will never have. ``refetch``: the upstream is
    fine but the store failed, so the reader may fetch the rest itself."""

    def __init__(self, position: int, *, refetch: bool) -> None:
        super().__init__(position)
        self.position, self.refetch = position, refetch


class Fill:
    def __init__(self, key: str, meta: ObjectMeta, spool: Spool) -> None:
        self.key, self.meta, self.spool = key, meta, spool
        self.written = 0
        self.ended = False  # the upstream transfer is over (whole or not)
        self.store_failed = False  # the spool could not be written
        self.committed = False
        self._progress = asyncio.Event()
        self._refs = 1  # the fill itself; each reader holds one more
        self.task: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)``, each as soon as it has arrived."""
        self._refs += 1
        try:
            position = start
            while position < end:
                available = min(self.written, end)
                if available > position:
                    data = await self.spool.read(position, min(available - position, READ_CHUNK))
                    if not data:
                        raise FillBroken(position, refetch=True)
                    position += len(data)
                    yield data
                elif self.ended or self.store_failed:
                    raise FillBroken(position, refetch=self.store_failed)
                else:
                    await self._progress.wait()
        finally:
            self._release()

    def _release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self.spool.discard()  # after a disk commit the spool path is gone already

    async def run(
        self, response: UpstreamResponse, commit: Callable[[Fill], Awaitable[None]]
    ) -> None:
        """Copy the upstream answer into the spool; commit it if it arrived whole."""
        metrics.CONTENT_FILLS.inc()
        try:
            if await self._copy(response):
                await commit(self)
                self.committed = True
        except StoreError as exc:
            metrics.CONTENT_STORE_ERRORS.labels("commit").inc()
            log.warning("content store: %s", exc)
        finally:  # cancelled at shutdown too: the spool goes with the last reader
            metrics.CONTENT_FILLS.dec()
            self._release()

    async def _copy(self, response: UpstreamResponse) -> bool:
        """True if the whole answer is in the spool."""
        size = self.meta.size
        try:
            async for chunk in response.aiter_raw():
                if self.written + len(chunk) > size:
                    log.warning("content longer than its Content-Length: not stored")
                    return False
                try:
                    self.spool.write(self.written, chunk)
                except StoreError as exc:
                    metrics.CONTENT_STORE_ERRORS.labels("fill").inc()
                    log.warning("content store: %s; relayed instead", exc)
                    self.store_failed = True
                    return False
                self.written += len(chunk)
                self._wake()
            if self.written != size:
                log.warning("content shorter than its Content-Length: not stored")
            return self.written == size
        except StreamBroken as exc:
            log.warning("content fill broke off upstream (%s): not stored", exc.kind)
            return False
        finally:
            self.ended = True
            self._wake()
            await response.aclose()

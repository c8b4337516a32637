"""Idempotent creates and remixes: the IETF httpapi ``Idempotency-Key``, Stripe's rules.

Scope: the tenant (its principal) plus the key. The first 2xx answer is stored with a
hash of the request for ``idempotency_ttl_seconds``; a retry with the same request gets
that answer again (``Idempotent-Replayed: true``) without an upstream call, and the same
key with another request is a 422. Definite failures (4xx, 5xx, no connection) are not
remembered, so a retry goes upstream; a create whose outcome is unknown (a timeout, a
broken answer, a claimant that died) keeps its key as "outcome unknown" (409) for the
TTL, since the video may exist. Concurrent duplicates wait for the first: in one process
they join its single flight, across replicas a pending record (``SET NX`` with a hold)
makes them wait for its answer, and a waiter never creates. At most one upstream create
per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from . import metrics
from .cache import MemoryStore
from .cache.base import IDEMPOTENCY, RecordsFull, RecordStore, RecordsUnavailable
from .coalesce import SingleFlight
from .errors import NotSent, ProxyError
from .exchange import Exchange, Reply
from .records import Backlog

log = logging.getLogger("proxy.idempotency")
HEADER = b"idempotency-key"
REPLAYED = (b"idempotent-replayed", b"true")
MAX_KEY_LENGTH = 255
WAIT_STEP_SECONDS = 0.02  # how often a duplicate on another replica looks for the answer


def key_of(ex: Exchange) -> str | None:
    """The request's Idempotency-Key, validated (400 before anything is sent)."""
    values = [value for name, value in ex.headers if name == HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise ProxyError(400, "Idempotency-Key given more than once", param="Idempotency-Key")
    key = values[0]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or any(not 0x20 <= b < 0x7F for b in key):
        raise ProxyError(
            400,
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            param="Idempotency-Key",
        )
    return key.decode("ascii")


def request_hash(path: str, content_type: bytes, body: bytes, doc: dict[str, Any] | None) -> str:
    """What makes two requests "the same": the route and the request's content.

    JSON is compared parsed (key order and spacing do not matter); multipart bytes
    without their boundary, which clients pick at random for every attempt.
    """
    digest = hashlib.sha256(path.encode() + b"\x00")
    if doc is not None:
        digest.update(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))
    else:
        _, _, boundary = content_type.partition(b"boundary=")
        boundary = boundary.split(b";")[0].strip().strip(b'"')
        digest.update(body.replace(boundary, b"") if boundary else body)
    return digest.hexdigest()


PENDING, UNKNOWN = 0, -1  # record states besides a stored answer (its HTTP status)


def _dumps(
    fingerprint: str, reply: Reply | None, *, state: int = PENDING, until: float = 0
) -> bytes:
    """A record: pending (claimed, no answer yet), unknown (no answer will come) or the
    answer to replay."""
    if reply is None:
        return orjson.dumps({"h": fingerprint, "s": state, "u": until}) + b"\n"
    ctype = next((v for k, v in reply.headers if k == b"content-type"), b"application/json")
    meta = {"h": fingerprint, "s": reply.status, "c": ctype.decode("latin-1")}
    return orjson.dumps(meta) + b"\n" + reply.body


def _loads(raw: bytes) -> tuple[str, int, float, Reply | None]:
    """(request hash, state or status, pending claim's hold end, answer to replay)."""
    meta_raw, _, body = raw.partition(b"\n")
    meta = orjson.loads(meta_raw)
    status = int(meta["s"])
    if status <= 0:
        return meta["h"], status, float(meta.get("u", 0)), None
    headers = [(b"content-type", meta["c"].encode("latin-1")), REPLAYED]
    return meta["h"], status, 0.0, Reply(status, headers, body)


def replayed(reply: Reply) -> Reply:
    return Reply(reply.status, [*reply.headers, REPLAYED], reply.body)


def outcome_unknown() -> ProxyError:
    return ProxyError(
        409,
        "the outcome of an earlier request with this Idempotency-Key is unknown (it may "
        "have created a video); check the job list, then retry with a new key",
        param="Idempotency-Key",
    )


def store_full(reason: str) -> ProxyError:
    return ProxyError(
        503, f"Idempotency-Key not accepted: {reason}; retry later",
        param="Idempotency-Key", headers={"retry-after": "60"},
    )  # fmt: skip


class Idempotency:
    store: RecordStore  # set once the store is open

    def __init__(
        self,
        ttl: float,
        lease: float,
        secret: bytes,
        local: RecordStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.lease = lease  # longest a pending record holds the key (the upstream timeout+)
        self.secret = secret
        self.clock = clock
        # In-process records: read first, and the only ones while the shared store is
        # down, so "deduplicated within the process" holds for sequential retries too.
        self.local = local if local is not None else MemoryStore(0, clock)
        self.backlog = Backlog()  # answers the shared store could not take yet
        self.flights: SingleFlight[tuple[Reply, bool]] = SingleFlight()

    def record_name(self, principal: str, key: str) -> str:
        # Hashed: the store never holds a client's key; the tenant part is the
        # fingerprint (an HMAC), so that each tenant's share of the store is counted.
        digest = hashlib.sha256(self.secret + b"|" + principal.encode() + b"|" + key.encode())
        return f"{IDEMPOTENCY}{principal}:{digest.hexdigest()[:40]}"

    async def run(
        self, principal: str, key: str, fingerprint: str, call: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        """The answer for this key: replayed, joined, or from ``call`` (at most once)."""
        name = self.record_name(principal, key)
        (reply, replay), joined = await self.flights.run(
            f"{name}|{fingerprint}", lambda: self._once(name, fingerprint, call)
        )
        if joined and not replay and 200 <= reply.status < 300:
            reply, replay = replayed(reply), True  # joined the first: its answer, replayed
        if replay:
            metrics.IDEMPOTENT_REPLAYS.inc()
        return reply

    # -- the records: this process's first, then the shared store ------------------------
    async def _read(self, name: str) -> bytes | None:
        [raw] = await self.local.get_records([name])
        if raw is not None or self.store is self.local:
            return raw
        try:
            [raw] = await self.store.get_records([name])
        except RecordsUnavailable:
            return None  # only this process's records can be asked now
        return raw

    async def _write(self, name: str, value: bytes, *, claim: bool = False) -> bool:
        """Write to the shared store; where it cannot answer (or this process holds the
        record already), to this process's records, the final ones queued for later."""
        [held_here] = await self.local.get_records([name])
        try:
            if held_here is None:
                return await self.store.put_record(name, value, self.ttl, only_new=claim)
        except RecordsFull as exc:
            raise store_full(str(exc)) from None
        except RecordsUnavailable:
            log.warning("idempotency records unavailable: deduplicating in this process")
        try:
            stored = await self.local.put_record(name, value, self.ttl, only_new=claim)
        except RecordsFull as exc:
            raise store_full(str(exc)) from None
        if not claim and self.store is not self.local:  # for the shared store, later
            self.backlog.add(name, value, self.clock() + self.ttl)
        return stored

    async def _forget(self, name: str) -> None:
        await self.local.delete_record(name)
        self.backlog.discard(name)
        try:
            await self.store.delete_record(name)
        except RecordsUnavailable:
            log.warning("idempotency record not removed: the key stays claimed")

    async def flush_backlog(self) -> None:
        """Write the answers kept while the shared store was down (periodically)."""
        if self.store is not self.local:
            await self.backlog.flush(self.store, self.clock)

    # -- one key ------------------------------------------------------------------------
    async def _once(
        self, name: str, fingerprint: str, call: Callable[[], Awaitable[Reply]]
    ) -> tuple[Reply, bool]:
        """(answer, replayed): a stored answer, or the upstream's after claiming the key.

        A request that found the key claimed by another never becomes its creator: once
        the claim's hold is over, or the claim is gone without an answer, it gets 409.
        """
        give_up = time.monotonic() + self.lease
        waited = False
        while True:
            raw = await self._read(name)
            if raw is not None:
                stored_hash, state, until, stored = _loads(raw)
                if stored_hash != fingerprint:
                    raise ProxyError(
                        422,
                        "Idempotency-Key reused with a different request body",
                        param="Idempotency-Key",
                    )
                if stored is not None:
                    return stored, True
                if state == UNKNOWN or self.clock() > until or time.monotonic() > give_up:
                    raise outcome_unknown()
                waited = True
                await asyncio.sleep(WAIT_STEP_SECONDS)  # another process's create
                continue
            if waited:  # the claim ended without an answer to replay (a failure)
                raise ProxyError(
                    409,
                    "a concurrent request with this Idempotency-Key failed; retry",
                    param="Idempotency-Key",
                )
            pending = _dumps(fingerprint, None, until=self.clock() + self.lease)
            if await self._write(name, pending, claim=True):
                break
        return await self._claimed(name, fingerprint, call), False

    async def _claimed(
        self, name: str, fingerprint: str, call: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        try:
            reply = await call()
        except NotSent:
            await self._forget(name)  # nothing was sent: a retry may create
            raise
        except BaseException:
            # A timeout, a broken answer, a shutdown: the create may have happened.
            unknown = _dumps(fingerprint, None, state=UNKNOWN)
            with contextlib.suppress(ProxyError):
                await self._write(name, unknown)
            raise
        if 200 <= reply.status < 300:
            try:
                await self._write(name, _dumps(fingerprint, reply))
            except ProxyError:
                log.warning("idempotency answer not stored: the key stays claimed")
        else:
            await self._forget(name)  # a definite refusal: not remembered
        return reply

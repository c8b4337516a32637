"""Idempotent creates and remixes: the IETF httpapi ``Idempotency-Key``, Stripe's rules.

Scope: the tenant (its principal) plus the key. The first 2xx answer is stored with a
hash of the request for ``idempotency_ttl_seconds``; a retry with the same request gets
that answer again (``Idempotent-Replayed: true``) without an upstream call, and the same
key with another request is a 422. Failures (4xx, 5xx, timeouts) are not remembered, so
a retry goes upstream. Concurrent duplicates wait for the first: in one process they
join its single flight, across replicas a pending record (``SET NX`` with a lease)
makes them wait for its answer. At most one upstream create per key.
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
from .cache.base import IDEMPOTENCY, RecordStore, RecordsUnavailable
from .coalesce import SingleFlight
from .errors import ProxyError
from .exchange import Exchange, Reply

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


def _dumps(fingerprint: str, reply: Reply | None) -> bytes:
    """A record: pending (no reply yet) or the answer to replay."""
    if reply is None:
        return orjson.dumps({"h": fingerprint, "s": 0}) + b"\n"
    ctype = next((v for k, v in reply.headers if k == b"content-type"), b"application/json")
    meta = {"h": fingerprint, "s": reply.status, "c": ctype.decode("latin-1")}
    return orjson.dumps(meta) + b"\n" + reply.body


def _loads(raw: bytes) -> tuple[str, Reply | None]:
    meta_raw, _, body = raw.partition(b"\n")
    meta = orjson.loads(meta_raw)
    if not meta["s"]:
        return meta["h"], None
    headers = [(b"content-type", meta["c"].encode("latin-1")), REPLAYED]
    return meta["h"], Reply(meta["s"], headers, body)


def replayed(reply: Reply) -> Reply:
    return Reply(reply.status, [*reply.headers, REPLAYED], reply.body)


class Idempotency:
    store: RecordStore  # set once the store is open

    def __init__(self, ttl: float, lease: float, secret: bytes) -> None:
        self.ttl = ttl
        self.lease = lease  # longest a pending record holds the key (the upstream timeout+)
        self.secret = secret
        self.flights: SingleFlight[tuple[Reply, bool]] = SingleFlight()

    def record_name(self, principal: str, key: str) -> str:
        # Hashed: the store never holds a client's key, and names stay short.
        digest = hashlib.sha256(self.secret + b"|" + principal.encode() + b"|" + key.encode())
        return IDEMPOTENCY + digest.hexdigest()[:40]

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

    async def _once(
        self, name: str, fingerprint: str, call: Callable[[], Awaitable[Reply]]
    ) -> tuple[Reply, bool]:
        """(answer, replayed): a stored answer, or the upstream's after claiming the key."""
        give_up = time.monotonic() + self.lease
        try:
            while True:
                [raw] = await self.store.get_records([name])
                if raw is not None:
                    stored_hash, stored = _loads(raw)
                    if stored_hash != fingerprint:
                        raise ProxyError(
                            422,
                            "Idempotency-Key reused with a different request body",
                            param="Idempotency-Key",
                        )
                    if stored is not None:
                        return stored, True
                    if time.monotonic() > give_up:
                        raise ProxyError(
                            409, "a request with this Idempotency-Key is still in progress"
                        )
                    await asyncio.sleep(WAIT_STEP_SECONDS)  # another replica's create
                    continue
                if await self.store.put_record(
                    name, _dumps(fingerprint, None), self.lease, only_new=True
                ):
                    break
        except RecordsUnavailable:
            # The shared store is down: deduplicate in this process only, rather than
            # refuse every create.
            log.warning("idempotency records unavailable: create not deduplicated")
            return await call(), False
        return await self._claimed(name, fingerprint, call), False

    async def _claimed(
        self, name: str, fingerprint: str, call: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        try:
            reply = await call()
        except BaseException:
            with contextlib.suppress(RecordsUnavailable):
                await self.store.delete_record(name)  # not remembered: a retry goes upstream
            raise
        try:
            if 200 <= reply.status < 300:
                await self.store.put_record(name, _dumps(fingerprint, reply), self.ttl)
            else:
                await self.store.delete_record(name)
        except RecordsUnavailable:
            log.warning("idempotency record not written: a retry will create again")
        return reply

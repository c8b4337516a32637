"""Where followed jobs live: this process (memory backend), or Redis, so that they
survive a restart and another replica takes over when the following one dies.

A followed job is leased by the replica that polls it (renewed on every poll, expiring
after a few poll intervals); a replica that finds an expired lease takes the job over.
An event's delivery is marked done once it is over. The creator's
credentials (needed to poll as the creator) are stored encrypted (Fernet, keyed from
``cache_key_secret``), never in plain text.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import orjson
from cryptography.fernet import Fernet, InvalidToken

from .policy import CREDENTIAL_HEADERS, EXTRA_HEADER_PREFIX

PREFIX = "bvp:wh:"
SENT_TTL_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Followed:
    key: str  # the cache key (family, canonical id, tenant fingerprint): unique per job
    job_id: str  # canonical id
    family: str
    endpoint: str
    started: float  # wall-clock seconds
    credentials: str  # encrypted credential headers (a Fernet token)


class Sealer:
    """Encrypts the credential headers a follower polls with."""

    def __init__(self, secret: bytes, identity_header: bytes | None = None) -> None:
        key = base64.urlsafe_b64encode(hashlib.sha256(b"webhooks|" + secret).digest())
        self._fernet = Fernet(key)
        self._identity = identity_header  # ownership_header: the follower polls as the owner

    def seal(self, headers: list[tuple[bytes, bytes]]) -> str:
        kept = [
            [n.decode("latin-1"), v.decode("latin-1")]
            for n, v in headers
            if n in CREDENTIAL_HEADERS or n.startswith(EXTRA_HEADER_PREFIX) or n == self._identity
        ]
        return self._fernet.encrypt(orjson.dumps(kept)).decode()

    def open(self, token: str) -> list[tuple[bytes, bytes]] | None:
        try:
            pairs = orjson.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, orjson.JSONDecodeError):
            return None  # another secret: not ours to poll
        return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


class Follows(Protocol):
    async def add(self, job: Followed) -> None: ...
    async def remove(self, key: str) -> None: ...
    async def all(self) -> list[Followed]: ...
    async def lease(self, key: str, owner: str, seconds: float) -> bool:
        """Take or renew the lease on a job; False while another replica holds it."""
        ...

    async def delivered(self, event_id: str, endpoint: str) -> bool:
        """Whether this event's delivery to this endpoint is over (across replicas)."""
        ...

    async def mark_delivered(self, event_id: str, endpoint: str) -> None: ...


class MemoryFollows:
    def __init__(self) -> None:
        self._jobs: dict[str, Followed] = {}
        self._sent: set[tuple[str, str]] = set()

    async def add(self, job: Followed) -> None:
        self._jobs[job.key] = job

    async def remove(self, key: str) -> None:
        self._jobs.pop(key, None)

    async def all(self) -> list[Followed]:
        return list(self._jobs.values())

    async def lease(self, key: str, owner: str, seconds: float) -> bool:
        return True

    async def delivered(self, event_id: str, endpoint: str) -> bool:
        return (event_id, endpoint) in self._sent

    async def mark_delivered(self, event_id: str, endpoint: str) -> None:
        self._sent.add((event_id, endpoint))


class RedisFollows:
    """Followed jobs in one Redis hash; leases and delivery claims as SET NX keys."""

    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) "
        "else return redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0 end"
    )

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def add(self, job: Followed) -> None:
        await self._redis.hset(PREFIX + "jobs", job.key, orjson.dumps(asdict(job)))

    async def remove(self, key: str) -> None:
        await self._redis.hdel(PREFIX + "jobs", key)

    async def all(self) -> list[Followed]:
        raw = await self._redis.hgetall(PREFIX + "jobs")
        jobs = []
        for value in raw.values():
            try:
                jobs.append(Followed(**orjson.loads(value)))
            except (orjson.JSONDecodeError, TypeError):
                continue
        return jobs

    async def lease(self, key: str, owner: str, seconds: float) -> bool:
        name = PREFIX + "lease:" + key
        return bool(await self._redis.eval(self._RENEW, 1, name, owner, int(seconds * 1000)))

    async def delivered(self, event_id: str, endpoint: str) -> bool:
        return bool(await self._redis.exists(PREFIX + "sent:" + event_id + ":" + endpoint))

    async def mark_delivered(self, event_id: str, endpoint: str) -> None:
        name = PREFIX + "sent:" + event_id + ":" + endpoint
        await self._redis.set(name, 1, ex=SENT_TTL_SECONDS)

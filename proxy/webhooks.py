"""Webhooks for video jobs: follow a job created with ``X-Proxy-Webhook: NAME`` and call
the endpoint once when it ends, signed as Standard Webhooks (what the OpenAI SDK's
``client.webhooks.verify_signature`` checks).

Endpoints come from configuration only (never from a request: no SSRF). Following
polls through the same single flight and cache as everyone else, every
``webhook_poll_seconds``. Delivery: any 2xx acknowledges; anything else, or no answer
within ``webhook_timeout_seconds``, is retried on ``webhook_retry_schedule`` with the
same ``webhook-id`` (``Retry-After`` honoured when longer); 410 stops; redirects are
not followed. Followed jobs live in ``follows`` (this process, or Redis, where another
replica takes a job over when its follower dies, retries included): at least once
overall, and once per job end unless a replica dies between a delivery and marking it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from cachetools import LRUCache
from redis.exceptions import RedisError

from . import metrics
from .errors import ProxyError
from .exchange import Reply
from .follows import Followed, Follows, MemoryFollows, Sealer
from .policy import CREDENTIAL_HEADERS, TERMINAL
from .rewrite import parse_json_object
from .settings import WEBHOOK_EVENTS, Settings, retry_schedule
from .watch import job_state

log = logging.getLogger("proxy.webhooks")
HEADER = b"x-proxy-webhook"  # the opt-in request header; never forwarded upstream
READ_BUFFER_BYTES = 4096  # what one delivery attempt may buffer of a receiver's answer
Poll = Callable[[], Awaitable[Reply]]
Poller = Callable[["Followed", list[tuple[bytes, bytes]]], Poll]  # a job's poll, as its creator


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    secrets: tuple[bytes, ...]  # decoded; several during a rotation: each signs
    events: frozenset[str] = WEBHOOK_EVENTS
    # SHA-256 (hex) of the credential values allowed to name it; empty: any tenant.
    tenants: frozenset[str] = frozenset()

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool:
        if not self.tenants:
            return True
        return any(
            hashlib.sha256(value).hexdigest() in self.tenants
            for name, value in headers
            if name in CREDENTIAL_HEADERS
        )

    def __repr__(self) -> str:  # never print the secrets
        return f"Endpoint({self.name!r}, {self.url!r})"


def decode_secret(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def signatures(secrets: tuple[bytes, ...], event_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per secret."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(s, signed, hashlib.sha256).digest()).decode()
        for s in secrets
    )


def event_type(job: dict[str, Any]) -> str:
    return "video.completed" if job.get("status") == "completed" else "video.failed"


def event_body(event_id: str, kind: str, job: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {"id": event_id, "object": "event", "type": kind, "created_at": int(time.time()),
         "data": job}
    )  # fmt: skip


class Webhooks:
    def __init__(self, settings: Settings) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        if settings.webhook_url:
            secret = decode_secret(settings.webhook_secret)
            self.endpoints["default"] = Endpoint("default", settings.webhook_url, (secret,))
        for name, spec in settings.webhook_endpoints.items():
            keys = spec.get("secrets", [spec.get("secret")])
            self.endpoints[name] = Endpoint(
                name, spec["url"], tuple(decode_secret(k) for k in keys),
                frozenset(spec.get("events", WEBHOOK_EVENTS)), frozenset(spec.get("tenants", [])),
            )  # fmt: skip
        self.all_jobs = settings.webhook_all_jobs
        self.poll_seconds = settings.webhook_poll_seconds
        self.follow_max = settings.webhook_follow_max_seconds
        self.timeout = settings.webhook_timeout_seconds
        self.schedule = retry_schedule(settings.webhook_retry_schedule)
        # Leases outlive a few polls: a replica that stops renewing loses its jobs.
        self.lease_seconds = max(3 * self.poll_seconds, 1.0)
        self.owner = secrets.token_hex(8)
        self.follows: Follows = MemoryFollows()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # This process's recent events, for the admin routes: (event id, endpoint) -> record.
        self.events: LRUCache[tuple[str, str], dict[str, Any]] = LRUCache(1000)

    def endpoint(
        self, name: bytes | None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> Endpoint | None:
        """The endpoint a create asks for (``default`` for every create with
        ``webhook_all_jobs``); a 400, before any upstream call, if unknown, or if the
        endpoint lists its tenants and this is not one of them (the same answer: an
        endpoint another app owns is not revealed)."""
        if name is None:
            default = self.endpoints["default"] if self.all_jobs else None
            return default if default is not None and default.allows(headers or []) else None
        endpoint = self.endpoints.get(name.decode("latin-1").strip())
        if endpoint is None or not endpoint.allows(headers or []):
            raise ProxyError(400, "X-Proxy-Webhook names no configured webhook endpoint")
        return endpoint

    def start(self, follows: Follows, sealer: Sealer, poller: Poller) -> None:
        """Begin following: resume jobs left by a restart or a dead replica (Redis)."""
        self.follows, self.sealer, self.poller = follows, sealer, poller
        self._scanner = asyncio.ensure_future(self._scan())

    async def follow_new(
        self, key: str, job_id: str, family: str, endpoint: Endpoint,
        headers: list[tuple[bytes, bytes]],
    ) -> None:  # fmt: skip
        """A create asked for a webhook: record the job, then follow it from here."""
        job = Followed(key, job_id, family, endpoint.name, time.time(), self.sealer.seal(headers))
        try:
            await self.follows.add(job)
            await self.follows.lease(key, self.owner, self.lease_seconds)
        except (RedisError, OSError) as exc:  # still followed here, just not shared
            log.warning("webhook: could not record a followed job (%s)", type(exc).__name__)
        self._follow_here(job)

    def _follow_here(self, job: Followed) -> None:
        task = asyncio.ensure_future(self._follow(job))
        self._tasks[job.key] = task
        metrics.WEBHOOKS_PENDING.inc()
        task.add_done_callback(lambda _t: self._done(job.key, task))

    def follow_count(self) -> int:
        """Jobs followed, or events still being delivered, by this process."""
        return len(self._tasks)

    def _done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        metrics.WEBHOOKS_PENDING.dec()

    async def _scan(self) -> None:
        """Take over followed jobs whose lease expired (their replica is gone)."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                for job in await self.follows.all():
                    if job.key in self._tasks:
                        continue
                    if await self.follows.lease(job.key, self.owner, self.lease_seconds):
                        self._follow_here(job)
            except (RedisError, OSError):
                continue
            except Exception:
                log.exception("webhook scan failed")

    async def _follow(self, job: Followed) -> None:
        endpoint = self.endpoints.get(job.endpoint)
        headers = self.sealer.open(job.credentials)
        if endpoint is None or headers is None:
            log.warning("webhook: dropping a followed job this configuration cannot serve")
            await self._forget(job.key)
            return
        poll = self.poller(job, headers)
        try:
            while time.time() < job.started + self.follow_max:
                await asyncio.sleep(self.poll_seconds)
                if not await self._keep_lease(job.key):
                    return  # another replica follows it now
                try:
                    reply = await poll()
                except ProxyError:
                    continue
                state = job_state(reply)
                if state is not None and state[0] in TERMINAL:
                    body = parse_json_object(reply.body) or {}
                    if not await self.deliver(endpoint, job.job_id, body, job.key):
                        return  # lost the lease mid-retries: its new holder goes on
                    break
            else:
                log.warning("webhook: gave up following a job after webhook_follow_max_seconds")
            await self._forget(job.key)
        except Exception:  # a follower must never take the process down
            log.exception("webhook follower failed")

    async def _keep_lease(self, key: str) -> bool:
        try:
            return await self.follows.lease(key, self.owner, self.lease_seconds)
        except (RedisError, OSError):
            return True  # Redis down: keep following here

    async def _forget(self, key: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.follows.remove(key)

    async def deliver(self, endpoint: Endpoint, job_id: str, job: dict[str, Any], key: str) -> bool:
        """One event, retried on the schedule until a 2xx, a 410, or the end of it.

        The job's lease is held throughout (retries can span days): if this replica
        dies, another takes the job over and delivers again, at least once overall;
        the event is marked done in the shared store only when its delivery is over.
        False when the lease was lost to another replica meanwhile.
        """
        event_id = (
            "evt_" + hashlib.sha256(f"{job_id}|{job.get('status')}".encode()).hexdigest()[:24]
        )
        kind = event_type(job)
        if kind not in endpoint.events:
            return True  # this endpoint's event filter leaves it out
        try:
            if await self.follows.delivered(event_id, endpoint.name):
                return True  # a replica that died after delivering it
        except (RedisError, OSError):
            pass  # Redis down: deliver (at least once beats never)
        body = event_body(event_id, kind, job)
        record = {"event_id": event_id, "endpoint": endpoint.name, "type": kind,
                  "job_id": job_id, "attempts": 0, "outcome": "pending", "body": body}  # fmt: skip
        self.events[(event_id, endpoint.name)] = record
        for attempt in range(len(self.schedule) + 1):
            outcome, retry_after = await self._attempt(endpoint, event_id, body)
            metrics.WEBHOOK_DELIVERIES.labels(endpoint.name, outcome).inc()
            record["attempts"], record["outcome"] = attempt + 1, outcome
            if outcome in ("delivered", "gone") or attempt == len(self.schedule):
                break
            if not await self._wait_holding(key, max(self.schedule[attempt], retry_after)):
                return False
        with contextlib.suppress(RedisError, OSError):
            await self.follows.mark_delivered(event_id, endpoint.name)
        return True

    async def _wait_holding(self, key: str, seconds: float) -> bool:
        """Sleep, renewing the job's lease; False if another replica took it."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.lease_seconds / 3))
            if not await self._keep_lease(key):
                return False
        return True

    async def _attempt(self, endpoint: Endpoint, event_id: str, body: bytes) -> tuple[str, float]:
        if self._session is None:  # made on first use: most proxies never deliver
            self._session = aiohttp.ClientSession(
                # No keep-alive: every attempt's connection is closed once its status
                # is known, whatever the receiver still sends (memory stays bounded).
                connector=aiohttp.TCPConnector(force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                read_bufsize=READ_BUFFER_BYTES,
            )
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signatures(endpoint.secrets, event_id, timestamp, body),
        }
        started = time.perf_counter()
        try:
            async with self._session.post(
                endpoint.url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:  # fmt: skip
                # The status decides; the body is never read whole (a receiver could
                # send 100 MiB, or an endless chunked answer): the connection is closed.
                status = response.status
                retry = response.headers.get("retry-after", "")
                response.close()
        except (TimeoutError, aiohttp.ClientError):
            return "error", 0.0
        finally:
            metrics.WEBHOOK_SECONDS.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            return "delivered", 0.0
        if status == 410:
            return "gone", 0.0
        return "failed", float(retry) if retry.isdigit() else 0.0

    async def report(self) -> dict[str, Any]:
        try:
            followed = await self.follows.all()
        except (RedisError, OSError):
            followed = []
        return {
            "followed": [
                {"job_id": f.job_id, "endpoint": f.endpoint, "started": f.started,
                 "here": f.key in self._tasks}
                for f in followed
            ],
            "events": [
                {k: v for k, v in record.items() if k != "body"}
                for record in self.events.values()
            ],
        }  # fmt: skip

    async def redeliver(self, event_id: str) -> str | None:
        """One more attempt of a recent event (same webhook-id); None if unknown here."""
        for (known, name), record in list(self.events.items()):
            endpoint = self.endpoints.get(name)
            if known == event_id and endpoint is not None:
                outcome, _ = await self._attempt(endpoint, event_id, record["body"])
                metrics.WEBHOOK_DELIVERIES.labels(name, outcome).inc()
                record["attempts"] += 1
                record["outcome"] = outcome
                return outcome
        return None

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        if self._scanner is not None:
            tasks.append(self._scanner)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

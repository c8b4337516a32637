"""Webhooks for video jobs: follow a job created with ``X-Proxy-Webhook: NAME`` and call
the endpoint once when it ends, signed as Standard Webhooks (what the OpenAI SDK's
``client.webhooks.verify_signature`` checks).

Endpoints come from configuration only (never from a request: no SSRF). Following
polls through the same single flight and cache as everyone else, every
``webhook_poll_seconds``. Delivery: any 2xx acknowledges; anything else, or no answer
within ``webhook_timeout_seconds``, is retried on ``webhook_retry_schedule`` with the
same ``webhook-id`` (``Retry-After`` honoured when longer); 410 stops; redirects are
not followed. This process keeps followed jobs and pending deliveries in memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from . import metrics
from .errors import ProxyError
from .exchange import Reply
from .policy import TERMINAL
from .rewrite import parse_json_object
from .settings import WEBHOOK_EVENTS, Settings, retry_schedule
from .watch import job_state

log = logging.getLogger("proxy.webhooks")
HEADER = b"x-proxy-webhook"  # the opt-in request header; never forwarded upstream
Poll = Callable[[], Awaitable[Reply]]


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    secrets: tuple[bytes, ...]  # decoded; several during a rotation: each signs
    events: frozenset[str] = WEBHOOK_EVENTS

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
            secrets = spec.get("secrets", [spec.get("secret")])
            self.endpoints[name] = Endpoint(
                name, spec["url"], tuple(decode_secret(s) for s in secrets),
                frozenset(spec.get("events", WEBHOOK_EVENTS)),
            )  # fmt: skip
        self.all_jobs = settings.webhook_all_jobs
        self.poll_seconds = settings.webhook_poll_seconds
        self.follow_max = settings.webhook_follow_max_seconds
        self.timeout = settings.webhook_timeout_seconds
        self.schedule = retry_schedule(settings.webhook_retry_schedule)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def endpoint(self, name: bytes | None) -> Endpoint | None:
        """The endpoint a create asks for (``default`` for every create with
        ``webhook_all_jobs``); a 400, before any upstream call, if unknown."""
        if name is None:
            return self.endpoints["default"] if self.all_jobs else None
        endpoint = self.endpoints.get(name.decode("latin-1").strip())
        if endpoint is None:
            raise ProxyError(400, "X-Proxy-Webhook names no configured webhook endpoint")
        return endpoint

    def follow(self, job_id: str, poll: Poll, endpoint: Endpoint) -> None:
        task = asyncio.ensure_future(self._follow(job_id, poll, endpoint))
        self._tasks.add(task)
        metrics.WEBHOOKS_PENDING.inc()
        task.add_done_callback(self._done)

    def follow_count(self) -> int:
        """Jobs followed, or events still being delivered, by this process."""
        return len(self._tasks)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        metrics.WEBHOOKS_PENDING.dec()

    async def _follow(self, job_id: str, poll: Poll, endpoint: Endpoint) -> None:
        deadline = time.monotonic() + self.follow_max
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(self.poll_seconds)
                try:
                    reply = await poll()
                except ProxyError:
                    continue
                state = job_state(reply)
                if state is not None and state[0] in TERMINAL:
                    job = parse_json_object(reply.body) or {}
                    await self.deliver(endpoint, job_id, job)
                    return
            log.warning("webhook: gave up following a job after webhook_follow_max_seconds")
        except Exception:  # a follower must never take the process down
            log.exception("webhook follower failed")

    async def deliver(self, endpoint: Endpoint, job_id: str, job: dict[str, Any]) -> None:
        """One event, retried on the schedule until a 2xx, a 410, or the end of it."""
        event_id = (
            "evt_" + hashlib.sha256(f"{job_id}|{job.get('status')}".encode()).hexdigest()[:24]
        )
        kind = event_type(job)
        if kind not in endpoint.events:
            return  # this endpoint's event filter leaves it out
        body = event_body(event_id, kind, job)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        for attempt in range(len(self.schedule) + 1):
            outcome, retry_after = await self._attempt(endpoint, event_id, body)
            metrics.WEBHOOK_DELIVERIES.labels(endpoint.name, outcome).inc()
            if outcome in ("delivered", "gone") or attempt == len(self.schedule):
                return
            await asyncio.sleep(max(self.schedule[attempt], retry_after))

    async def _attempt(self, endpoint: Endpoint, event_id: str, body: bytes) -> tuple[str, float]:
        assert self._session is not None
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
                await response.read()
                status = response.status
                retry = response.headers.get("retry-after", "")
        except (TimeoutError, aiohttp.ClientError):
            return "error", 0.0
        finally:
            metrics.WEBHOOK_SECONDS.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            return "delivered", 0.0
        if status == 410:
            return "gone", 0.0
        return "failed", float(retry) if retry.isdigit() else 0.0

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

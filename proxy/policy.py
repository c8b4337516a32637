"""The caching rules: a request and an answer in, a decision out. Pure, no I/O.

Only retrieve answers are cached. Terminal ones (``completed``/``failed``) live until
``expires_at`` (or ``terminal_ttl_seconds`` without one), capped by
``max_ttl_seconds``; running ones (``queued``/``in_progress``) live
``poll_coalesce_seconds`` so that a burst of polls costs one upstream call.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

TERMINAL = frozenset({"completed", "failed"})
RUNNING = frozenset({"queued", "in_progress"})
CREDENTIAL_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"x-goog-api-key", b"x-bf-vk", b"x-bf-api-key",
     b"x-bf-api-key-id"}
)  # fmt: skip
EXTRA_HEADER_PREFIX = b"x-bf-eh-"


class EntryKind(StrEnum):
    TERMINAL = "terminal"  # served as HIT
    RUNNING = "running"  # served as COALESCED


@dataclass(frozen=True, slots=True)
class CacheLimits:
    terminal_ttl_seconds: float = 3600.0
    max_ttl_seconds: float = 7 * 24 * 3600.0
    poll_coalesce_seconds: float = 1.0
    max_entry_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoreDecision:
    kind: EntryKind
    deadline: float  # absolute time (same clock as ``now``) after which it is never served


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    no_store: bool = False  # neither read nor write the cache
    no_cache: bool = False  # go upstream, then refresh the entry

    @property
    def bypass(self) -> bool:
        return self.no_store or self.no_cache


def request_directives(cache_control: bytes | None) -> RequestDirectives:
    if not cache_control:
        return RequestDirectives()
    tokens = {t.strip().lower() for t in cache_control.split(b",")}
    return RequestDirectives(
        no_store=b"no-store" in tokens,
        no_cache=b"no-cache" in tokens or b"max-age=0" in tokens,
    )


def tenant_fingerprint(
    headers: Iterable[tuple[bytes, bytes]], secret: bytes, also: bytes | None = None
) -> str:
    """HMAC-SHA256 of the credential headers: equal only for equal credentials.

    ``also`` names one more header that is part of the identity (``ownership_header``,
    e.g. an end-user id). Requests without credentials share one fingerprint among
    themselves only.
    """
    parts = sorted(
        name.lower() + b"\x00" + value
        for name, value in headers
        if name.lower() in CREDENTIAL_HEADERS
        or name.lower().startswith(EXTRA_HEADER_PREFIX)
        or name.lower() == also
    )
    return _keyed_digest(secret, b"\x01".join(parts))


@functools.lru_cache(maxsize=4096)
def _keyed_digest(secret: bytes, credentials: bytes) -> str:
    """Memoised: a handful of tenants send the same credentials on every request, and
    the HMAC was the largest single cost of a cache miss (~7%)."""
    return hmac.new(secret, credentials, hashlib.sha256).hexdigest()[:32]


def cache_key(family: str, canonical_id: str, fingerprint: str) -> str:
    return f"{family}|{canonical_id}|{fingerprint}"


def reusable_answer(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a shared cache may reuse this answer at all (RFC 9111 §3, §5.2.2).

    Not when the upstream says ``Cache-Control: no-store`` or ``private``; nor
    ``no-cache``, which allows storing only to revalidate before every use, and the
    proxy has no validators to revalidate with (each use would be a full upstream
    call, so storing buys nothing); nor with ``Set-Cookie``, which belongs to the one
    client it was sent to.
    """
    for name, value in headers:
        name = name.lower()
        if name == b"set-cookie":
            return False
        if name == b"cache-control":
            for token in value.lower().split(b","):
                directive = token.split(b"=", 1)[0].strip()
                if directive in (b"no-store", b"private", b"no-cache"):
                    return False
    return True


def decide(
    status_code: int,
    doc: dict[str, Any] | None,
    body_size: int,
    now: float,
    limits: CacheLimits,
    directives: RequestDirectives = RequestDirectives(),
    answer_headers: Iterable[tuple[bytes, bytes]] = (),
) -> StoreDecision | None:
    """Whether (and until when) a retrieve answer may be stored; None: do not store."""
    if directives.no_store or status_code != 200 or doc is None:
        return None
    if body_size > limits.max_entry_bytes or not reusable_answer(answer_headers):
        return None
    status = doc.get("status")
    if not isinstance(status, str):  # a list or an object: relayed, never stored
        return None
    if status in TERMINAL:
        ttl = limits.terminal_ttl_seconds
        expires_at = doc.get("expires_at")
        if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
            ttl = expires_at - now
        ttl = min(ttl, limits.max_ttl_seconds)
        return StoreDecision(EntryKind.TERMINAL, now + ttl) if ttl > 0 else None
    if status in RUNNING and limits.poll_coalesce_seconds > 0:
        ttl = min(limits.poll_coalesce_seconds, limits.max_ttl_seconds)
        return StoreDecision(EntryKind.RUNNING, now + ttl)
    return None


def servable(deadline: float, now: float) -> bool:
    """An entry is never served at or after its deadline."""
    return now < deadline

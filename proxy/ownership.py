"""Job ownership: which tenant created each job through the proxy, and who may address it.

Behind one provider account, every credential that reaches Bifrost can address every
job whose id it learns. The proxy sees every create, so it records the creator's
identity (the tenant fingerprint, plus ``ownership_header`` when set) for
``max_ttl_seconds`` in the cache backend, and refuses any other tenant with the same 404
an unknown job gets, before any upstream call. Jobs it has no record of pass through
(the upstream's own credential checks still apply), unless ``job_ownership_strict``; a
store that cannot answer is treated the same way (strict mode: 503, fail closed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from cachetools import LRUCache

from . import metrics
from .cache.base import OWNERSHIP, RecordsFull, RecordStore, RecordsUnavailable
from .decoy import ForeignJob
from .errors import ProxyError
from .ids import IdRules, InvalidVideoId, VideoId, parse_decoded
from .policy import tenant_fingerprint
from .records import Backlog
from .settings import Settings

log = logging.getLogger("proxy.ownership")
CONFIRMED_MAX = 100_000  # (job, owner) pairs whose record this process has seen


def unavailable() -> ProxyError:
    return ProxyError(
        503, "job ownership cannot be checked right now; retry", headers={"retry-after": "1"}
    )


class Ownership:
    store: RecordStore  # set once the store is open

    def __init__(self, settings: Settings, secret: bytes, rules: IdRules) -> None:
        self.enforce = settings.enforce_job_ownership
        self.strict = settings.job_ownership_strict
        self.header = settings.ownership_header.lower().encode() or None
        self.ttl = settings.max_ttl_seconds
        self.secret = secret
        self.rules = rules
        self._confirmed: LRUCache[tuple[str, str], bool] = LRUCache(CONFIRMED_MAX)
        # Owners the store could not take (Redis down): known here, written later.
        self.backlog = Backlog()
        self.clock = time.time

    def principal(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """Who is asking: the credentials' fingerprint (and the ownership header)."""
        return tenant_fingerprint(headers, self.secret, self.header)

    async def record(self, answer: dict[str, Any] | None, principal: str) -> None:
        """Record the creator of the job a create or remix answered with (its JSON)."""
        job_id = answer.get("id") if answer is not None else None
        if not isinstance(job_id, str):
            return
        try:
            name = OWNERSHIP + parse_decoded(job_id, self.rules).canonical
        except InvalidVideoId:
            return
        try:
            await self.store.put_record(name, principal.encode(), self.ttl)
        except (RecordsUnavailable, RecordsFull):
            metrics.OWNERSHIP_UNRECORDED.inc()
            self.backlog.add(name, principal.encode(), self.clock() + self.ttl)
            log.warning("job ownership not recorded yet: held here until the store answers")

    async def flush_backlog(self) -> None:
        """Record the owners held while the store was down (periodically)."""
        if len(self.backlog):
            await self.backlog.flush(self.store, self.clock)

    def _unknown(self) -> bytes | None:
        """The store cannot answer: as for a job without a record (it passes, as the
        cache does without Redis), except in strict mode, which fails closed (503)."""
        if self.strict:
            raise unavailable()
        return None

    def _allowed(self, owner: bytes | None, principal: str) -> bool:
        if owner is None:
            return not self.strict
        return owner == principal.encode()

    async def check(self, video: VideoId, principal: str, route: str) -> None:
        """Raise ForeignJob (an unknown-job 404) unless ``principal`` may address this
        job; callers that can, answer it with a decoy (see ``decoy``)."""
        if not self.enforce:
            return
        if (video.canonical, principal) in self._confirmed:
            return
        name = OWNERSHIP + video.canonical
        owner = self.backlog.get(name, self.clock())
        if owner is None:
            try:
                [owner] = await self.store.get_records([name])
            except RecordsUnavailable:
                owner = self._unknown()
        if not self._allowed(owner, principal):
            metrics.OWNERSHIP_DENIED.labels(route).inc()
            raise ForeignJob(video)
        if owner is not None:
            # A job's owner never changes: the owner's next polls need no lookup.
            self._confirmed[video.canonical, principal] = True

    async def visible(self, items: Sequence[Any], principal: str, route: str) -> list[bool]:
        """For each list item, whether ``principal`` may see it."""
        if not self.enforce:
            return [True] * len(items)
        names: list[str | None] = []
        for item in items:
            job_id = item.get("id") if isinstance(item, dict) else None
            try:
                if not isinstance(job_id, str):
                    raise InvalidVideoId("not an id")
                names.append(OWNERSHIP + parse_decoded(job_id, self.rules).canonical)
            except InvalidVideoId:
                names.append(None)  # not a job id this proxy could have recorded
        try:
            owners = await self.store.get_records([n for n in names if n is not None])
        except RecordsUnavailable:
            owners = [self._unknown() for n in names if n is not None]
        now = self.clock()
        owners = [
            self.backlog.get(n, now) or owner
            for n, owner in zip((n for n in names if n is not None), owners, strict=True)
        ]
        found = iter(owners)
        shown = [self._allowed(next(found) if n else None, principal) for n in names]
        denied = shown.count(False)
        if denied:
            metrics.OWNERSHIP_DENIED.labels(route).inc(denied)
        return shown

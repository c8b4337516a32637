"""Contract drift: upstream answers on video routes that break the documented shape.

Bifrost ships often, and its own OpenAPI file already disagrees with its code. When an
answer breaks the shape the proxy relies on, it is relayed as today (ids rewritten,
nothing else changed) but never cached, counted in
``bifrost_proxy_upstream_contract_violations_total{route,field}`` and logged once per
route and field per hour, so an operator who upgrades Bifrost sees at once what changed.
Pure checks; the bookkeeping (metric, log) is in ``Drift``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import metrics

log = logging.getLogger("proxy.contract")
STATUSES = frozenset({"queued", "in_progress", "completed", "failed"})
# The bounded ``field`` label values.
FIELDS = ("status", "seconds", "id", "expires_at", "data.id")
LOG_EVERY_SECONDS = 3600.0


def _job_violations(job: dict[str, Any], *, new: bool, listed: bool) -> list[str]:
    found = []
    status = job.get("status")
    if not isinstance(status, str) or status not in STATUSES:
        found.append("status")
    seconds = job.get("seconds")  # a string; list items may carry null
    if not isinstance(seconds, str) and (seconds is not None or not listed) and "seconds" in job:
        found.append("seconds")
    expires = job.get("expires_at")
    if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
        found.append("expires_at")
    job_id = job.get("id")
    if new and not (isinstance(job_id, str) and ":" in job_id):
        found.append("id")
    return found


def violations(doc: dict[str, Any], kind: str) -> list[str]:
    """The fields of a 2xx answer that break the contract. ``kind``: ``job`` (a
    retrieve), ``new`` (a create, remix or edit: its id must carry ``:provider``) or
    ``list``."""
    if kind == "list":
        data = doc.get("data")
        if not isinstance(data, list):
            return ["data.id"]
        found: set[str] = set()
        for item in data:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                found.add("data.id")
                continue
            found.update(_job_violations(item, new=False, listed=True))
        return sorted(found)
    return _job_violations(doc, new=kind == "new", listed=False)


class Drift:
    """Counts and logs violations (each route and field logged once an hour)."""

    def __init__(self) -> None:
        self._logged: dict[tuple[str, str], float] = {}

    def report(self, route: str, found: list[str]) -> None:
        now = time.monotonic()
        for name in found:
            metrics.CONTRACT_VIOLATIONS.labels(route, name).inc()
            last = self._logged.get((route, name))
            if last is None or now - last >= LOG_EVERY_SECONDS:
                self._logged[(route, name)] = now
                log.warning(
                    "upstream answer breaks the documented shape: route=%s field=%s "
                    "(relayed, not cached; logged once an hour)", route, name,
                )  # fmt: skip

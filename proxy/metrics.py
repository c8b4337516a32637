"""Prometheus metrics: names and labels fixed by the operators' contract.

Label values are bounded: route templates (never raw paths), HTTP status codes,
known providers (others become ``other``), the four job statuses (others become
``unknown``). With several workers, prometheus-client's multiprocess mode sums
every worker's values; ``multiprocess_mode`` says how each gauge combines.
"""

from __future__ import annotations

import functools
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from . import __version__

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400)

REQUESTS = Counter(
    "bifrost_proxy_requests_total", "Requests answered, by route template.",
    ["route", "method", "status"],
)  # fmt: skip
REQUEST_DURATION = Histogram(
    "bifrost_proxy_request_duration_seconds", "Time to answer a request.",
    ["route", "method", "cache"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
UPSTREAM_DURATION = Histogram(
    "bifrost_proxy_upstream_request_duration_seconds",
    "Time until the upstream's answer headers (whole body for JSON routes).",
    ["route", "method", "status"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
BUDGET_REJECTIONS = Counter(
    "bifrost_proxy_budget_rejections_total",
    "Creates, remixes and edits refused by a tenant budget limit (429).", ["limit"],
)  # fmt: skip
for _limit in ("running_jobs", "video_seconds"):
    BUDGET_REJECTIONS.labels(_limit)
BUDGET_UNCHECKED = Counter(
    "bifrost_proxy_budget_unchecked_total",
    "Creates forwarded without a budget check because its store could not answer.",
)
RUNNING_JOBS = Gauge(
    "bifrost_proxy_running_jobs", "Jobs created through the proxy and not yet seen ended.",
    multiprocess_mode="livemax",  # the host store's count, the same in every worker
)  # fmt: skip
VIDEO_SECONDS = Counter(
    "bifrost_proxy_video_seconds_total", "Seconds of video of jobs that ended, by outcome.",
    ["provider", "outcome"],
)  # fmt: skip
VIDEO_COST = Counter(
    "bifrost_proxy_video_cost_total", "Provider-reported usage.cost of jobs that ended.",
    ["provider"],
)  # fmt: skip
CONTRACT_VIOLATIONS = Counter(
    "bifrost_proxy_upstream_contract_violations_total",
    "Upstream answers on video routes that broke the documented shape (relayed, uncached).",
    ["route", "field"],
)  # fmt: skip
UPSTREAM_ERRORS = Counter(
    "bifrost_proxy_upstream_errors_total", "Upstream calls that failed at transport level.",
    ["route", "kind"],
)  # fmt: skip
CACHE_REQUESTS = Counter(
    "bifrost_proxy_cache_requests_total", "Retrieves by cache result.", ["result"]
)
CACHE_ENTRIES = Gauge(
    "bifrost_proxy_cache_entries", "Entries held by the cache.", multiprocess_mode="livesum"
)
CACHE_BYTES = Gauge(
    "bifrost_proxy_cache_bytes", "Bytes held by the cache.", multiprocess_mode="livesum"
)
CACHE_EVICTIONS = Counter(
    "bifrost_proxy_cache_evictions_total", "Entries evicted to respect cache_max_bytes."
)
CACHE_BACKEND_ERRORS = Counter(
    "bifrost_proxy_cache_backend_errors_total", "Failed cache backend operations.",
    ["backend", "op"],
)  # fmt: skip
CALLS_SAVED = Counter(
    "bifrost_proxy_upstream_calls_saved_total", "Answers given without an upstream call."
)
TRANSITIONS = Counter(
    "bifrost_proxy_video_status_transitions_total",
    "Observed changes of a job's status, each counted once.",
    ["provider", "from_status", "to_status"],
)
JOB_DURATION = Histogram(
    "bifrost_proxy_video_job_duration_seconds", "completed_at - created_at of finished jobs.",
    ["provider", "outcome"], buckets=JOB_BUCKETS,
)  # fmt: skip
INFLIGHT = Gauge(
    "bifrost_proxy_inflight_requests", "Requests being handled.", multiprocess_mode="livesum"
)
WAITERS = Gauge(
    "bifrost_proxy_waiters", "Clients waiting on a job (long-poll or SSE).", ["kind"],
    multiprocess_mode="livesum",
)  # fmt: skip
WATCH_POLLS = Counter(
    "bifrost_proxy_watch_polls_total", "Polls made by job watchers for waiting clients.",
    ["provider"],
)  # fmt: skip
WAIT_SECONDS = Histogram(
    "bifrost_proxy_wait_seconds", "How long long-poll retrieves waited.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 120, 300),
)  # fmt: skip
WEBHOOK_DELIVERIES = Counter(
    "bifrost_proxy_webhook_deliveries_total",
    "Webhook delivery attempts: delivered (2xx), failed, error (no answer), gone (410).",
    ["endpoint", "outcome"],
)
WEBHOOK_SECONDS = Histogram(
    "bifrost_proxy_webhook_delivery_seconds", "Time of one webhook delivery attempt.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
WEBHOOKS_PENDING = Gauge(
    "bifrost_proxy_webhooks_pending", "Jobs followed, or events being delivered, for webhooks.",
    multiprocess_mode="livesum",
)  # fmt: skip
IDEMPOTENT_REPLAYS = Counter(
    "bifrost_proxy_idempotent_replays_total",
    "Creates and remixes answered from an earlier one with the same Idempotency-Key.",
)
OWNERSHIP_DENIED = Counter(
    "bifrost_proxy_ownership_denied_total",
    "Requests (and list items) refused because the job belongs to another tenant.",
    ["route"],
)
OWNERSHIP_UNRECORDED = Counter(
    "bifrost_proxy_ownership_unrecorded_total",
    "Jobs created whose owner could not be recorded (the shared store failed).",
)
BUILD_INFO = Gauge(
    "bifrost_proxy_build_info", "The running version.", ["version"], multiprocess_mode="max"
)
BUILD_INFO.labels(__version__).set(1)

CONTENT_REQUESTS = Counter(
    "bifrost_proxy_content_requests_total",
    "Content downloads by how they were answered: hit (whole, from the store), range "
    "(206), miss (filling or sharing a fill), bypass (relayed unstored), error (store "
    "failed: relayed).",
    ["result"],
)  # fmt: skip
CONTENT_BYTES = Counter(
    "bifrost_proxy_content_bytes_total", "Content bytes sent to clients, by source.",
    ["source"],
)  # fmt: skip
CONTENT_STORE_BYTES = Gauge(
    "bifrost_proxy_content_store_bytes", "Bytes the content store holds (spool included).",
    multiprocess_mode="livesum",  # one process per store reports it, the others 0
)  # fmt: skip
CONTENT_STORE_OBJECTS = Gauge(
    "bifrost_proxy_content_store_objects", "Objects the content store holds.",
    multiprocess_mode="livesum",
)  # fmt: skip
CONTENT_FILLS = Gauge(
    "bifrost_proxy_content_fills", "Content fills running (upstream transfers being stored).",
    multiprocess_mode="livesum",
)  # fmt: skip
CONTENT_STORE_ERRORS = Counter(
    "bifrost_proxy_content_store_errors_total",
    "Content store operations that failed (the download was relayed instead).", ["op"],
)  # fmt: skip
CONTENT_EVICTIONS = Counter(
    "bifrost_proxy_content_evictions_total", "Stored videos evicted to stay under the bound."
)
CONTENT_PREFETCHES = Counter(
    "bifrost_proxy_content_prefetches_total", "Fills started by content_prefetch."
)
CONTENT_RESULTS = ("hit", "range", "miss", "bypass", "error")
for _result in CONTENT_RESULTS:
    CONTENT_REQUESTS.labels(_result)
for _source in ("store", "upstream"):
    CONTENT_BYTES.labels(_source)
for _op in ("open", "read", "fill", "commit", "delete", "stats"):
    CONTENT_STORE_ERRORS.labels(_op)

CACHE_RESULTS = ("hit", "miss", "bypass", "coalesced", "stale")
for _result in CACHE_RESULTS:  # so dashboards see zeros, not gaps
    CACHE_REQUESTS.labels(_result)
for _kind in ("long_poll", "sse"):
    WAITERS.labels(_kind)
for _prefix in ("/v1/videos", "/openai/v1/videos"):
    for _tail in (
        "",
        "/{video_id}",
        "/{video_id}/remix",
        "/{video_id}/content",
        "/{video_id}/events",
    ):
        OWNERSHIP_DENIED.labels(_prefix + _tail)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, memoised (label values are bounded, see above):
    ``labels`` validates and locks on every call, a few µs on every request."""
    return metric.labels(*values)


def registry() -> CollectorRegistry:
    """The registry to expose: every worker's values when running multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return REGISTRY


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type (OpenMetrics when the scraper asks)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry()), content_type


class HitRecorder:
    """Cheap counting for the cache-hit fast path, flushed into Prometheus in batches.

    A HIT must cost next to nothing, so it only bumps plain integers here; ``flush``
    (every second, and before every scrape) adds them to the real metrics.
    """

    def __init__(self, routes: tuple[str, ...]) -> None:
        self.routes = routes
        bounds = len(LATENCY_BUCKETS) + 1
        self.counts = [0] * len(routes)
        self.sums = [0.0] * len(routes)
        self.buckets = [[0] * bounds for _ in routes]

    def record(self, route: int, seconds: float) -> None:
        self.counts[route] += 1
        self.sums[route] += seconds
        self.buckets[route][bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def flush(self) -> None:
        for i, route in enumerate(self.routes):
            count = self.counts[i]
            if not count:
                continue
            REQUESTS.labels(route, "GET", "200").inc(count)
            CACHE_REQUESTS.labels("hit").inc(count)
            CALLS_SAVED.inc(count)
            histogram = REQUEST_DURATION.labels(route, "GET", "hit")
            # prometheus-client has no bulk observe: add the batch to its bucket
            # counters and sum directly (the same values observe() would touch).
            histogram._sum.inc(self.sums[i])
            for bucket, n in enumerate(self.buckets[i]):
                if n:
                    histogram._buckets[bucket].inc(n)
            self.counts[i] = 0
            self.sums[i] = 0.0
            self.buckets[i] = [0] * len(self.buckets[i])

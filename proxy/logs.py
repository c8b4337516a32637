"""Logging setup: one JSON object per line (or plain text for humans).

Access records carry only fields the app put there (route template, status,
timings, request id, provider): never headers, credentials, query values or ids.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

ACCESS_FIELDS = (
    "method", "route", "status", "duration_ms", "cache", "upstream_ms", "request_id", "provider",
)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ACCESS_FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.getMessage() == "access":
            d = record.__dict__
            return (
                f"{d['method']} {d['route']} {d['status']} {d['duration_ms']}ms "
                f"cache={d['cache'] or '-'} upstream_ms={d['upstream_ms']} "
                f"provider={d['provider'] or '-'} id={d['request_id']}"
            )
        return super().format(record)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO: URLs hold video ids, keep them out.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _timestamp(created: float, cache: dict[int, str]) -> str:
    second = int(created)
    prefix = cache.get(second)
    if prefix is None:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cache.clear()
        cache[second] = prefix
    return f"{prefix}.{int((created - second) * 1000):03d}Z"


def write_access_batch(rows: list[dict[str, Any]]) -> None:
    """Write many access lines at once, formatted as the configured handler would.

    Used for cache hits, whose lines are buffered: the logging machinery per line
    would cost more than the hit itself.
    """
    root = logging.getLogger()
    if not rows or not logging.getLogger("proxy").isEnabledFor(logging.INFO):
        return
    handler = next((h for h in root.handlers if isinstance(h, logging.StreamHandler)), None)
    if handler is None:
        return
    as_json = isinstance(handler.formatter, JsonFormatter)
    stamps: dict[int, str] = {}
    out: list[str] = []
    for row in rows:
        stamp = _timestamp(row.pop("created"), stamps)
        if as_json:
            line = {"time": stamp, "level": "info", "logger": "proxy", "message": "access", **row}
            out.append(orjson.dumps(line).decode())
        else:
            out.append(
                f"{stamp} INFO proxy: {row['method']} {row['route']} {row['status']} "
                f"{row['duration_ms']}ms cache={row['cache']} upstream_ms=None "
                f"provider=- id={row['request_id']}"
            )
    handler.acquire()
    try:
        handler.stream.write("\n".join(out) + "\n")
        handler.flush()
    finally:
        handler.release()

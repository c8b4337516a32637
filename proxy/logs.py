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

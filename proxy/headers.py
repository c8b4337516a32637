"""Header filtering for a transparent HTTP/1.1 proxy (RFC 9110 §7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)  # fmt: skip

RawHeaders = list[tuple[bytes, bytes]]


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return named


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], *, also: frozenset[bytes] = frozenset()
) -> RawHeaders:
    """Drop hop-by-hop headers, every header ``Connection`` names, and ``also``."""
    headers = list(headers)
    drop = HOP_BY_HOP | _connection_named(headers) | also
    return [(n, v) for n, v in headers if n.lower() not in drop]


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of a header (``name`` lower-case), as ASGI gives them."""
    for n, v in headers:
        if n == name or n.lower() == name:
            return v
    return None

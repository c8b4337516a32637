"""Header filtering for a transparent HTTP/1.1 proxy (RFC 9110 §7.6.1), both ways.

Headers sent upstream are *built*: the client's end-to-end headers are kept, but no
header that describes the client's connection or the framing of its body ever is.
The HTTP client under the upstream seam writes its own ``Host`` and framing headers
for the body the proxy actually sends, so they can never disagree with it (a copied
``Content-Length`` on a bodiless GET once let the next request on a pooled
connection be read as that GET's body: request smuggling).
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ProxyError

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)  # fmt: skip

# Never copied upstream: hop-by-hop, plus what frames or routes the client's own request.
NOT_FORWARDED: frozenset[bytes] = HOP_BY_HOP | {
    b"content-length", b"expect", b"host", b"http2-settings",
}  # fmt: skip

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


def forwardable(
    client_headers: Iterable[tuple[bytes, bytes]], *, also: frozenset[bytes] = frozenset()
) -> RawHeaders:
    """The client's end-to-end headers, fit to send upstream unchanged.

    Framing, routing and hop-by-hop headers are dropped (see ``NOT_FORWARDED``).
    Values must be ASCII or valid UTF-8: they then reach the upstream byte-identical
    (aiohttp writes header text as UTF-8); any other bytes are refused with 400,
    naming the header, rather than re-encoded behind the client's back.
    """
    headers = strip_hop_by_hop(client_headers, also=NOT_FORWARDED | also)
    for name, value in headers:
        if not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                shown = name.decode("latin-1")
                raise ProxyError(
                    400, f"header {shown!r} has a value that is neither ASCII nor UTF-8"
                ) from None
    return headers


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of a header (``name`` lower-case), as ASGI gives them."""
    for n, v in headers:
        if n == name or n.lower() == name:
            return v
    return None

"""Byte ranges and conditional requests for stored content (RFC 9110 §13, §14): pure.

Given the request's ``Range``, ``If-Range`` and ``If-None-Match`` and what is known of
the object (length, strong ETag, Last-Modified), decide the answer's status and the byte
span to send. Only single ranges are answered 206; several ranges are answered 200 with
the whole object (RFC 9110 §14.2 lets a server ignore Range), as is any Range the proxy
does not understand (another unit, bad syntax).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    """What to answer: the status, and the bytes ``[start, end)`` to send (none for 304
    and 416)."""

    status: int  # 200, 206, 304 or 416
    start: int = 0
    end: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


def strong_etag(canonical_id: str, variant: str, size: int, completed_at: float) -> str:
    """A strong validator known before the last byte arrives: the same on the filling
    download and on every later HIT (the bytes of a completed job's variant never
    change; a new length or completion would be another object)."""
    seed = f"{canonical_id}\0{variant}\0{size}\0{completed_at!r}".encode()
    return '"' + hashlib.sha256(seed).hexdigest()[:32] + '"'


def parse_range(value: bytes, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range of an object of ``size`` bytes as ``(start, end)``
    (end exclusive); ``"unsatisfiable"``; or None when the header is to be ignored
    (not bytes, malformed, or several ranges)."""
    unit, sep, spec = value.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes":
        return None
    ranges = [r.strip() for r in spec.split(b",") if r.strip()]
    if len(ranges) != 1:
        return None
    first, dash, last = ranges[0].partition(b"-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:  # suffix: the last N bytes
        if not last:
            return None
        n = _number(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(size - n, 0), size)
    start = _number(first)
    if last and _number(last) < start:
        return None  # invalid range-spec: ignored
    if start >= size:
        return "unsatisfiable"
    end = min(_number(last) + 1, size) if last else size
    return (start, end)


def _number(digits: bytes) -> int:
    """A position; any run of more than 18 digits is past every object (and int() of
    thousands of digits would be refused or slow)."""
    return int(digits) if len(digits) <= 18 else 10**18


def _etags(value: bytes) -> list[bytes]:
    return [tag.strip() for tag in value.split(b",") if tag.strip()]


def none_match(value: bytes, etag: bytes) -> bool:
    """``If-None-Match`` holds (weak comparison): the client has this representation."""
    bare = etag.removeprefix(b"W/")
    return any(tag == b"*" or tag.removeprefix(b"W/") == bare for tag in _etags(value))


def plan(
    size: int,
    etag: bytes,
    last_modified: bytes | None,
    *,
    range_header: bytes | None,
    if_range: bytes | None,
    if_none_match: bytes | None,
) -> Plan:
    """The answer to a GET of a stored object."""
    if if_none_match is not None and none_match(if_none_match, etag):
        return Plan(304)
    whole = Plan(200, 0, size)
    if range_header is None:
        return whole
    if if_range is not None:
        # An entity tag must match strongly; a date must equal Last-Modified exactly
        # (RFC 9110 §13.1.5); else the whole object is sent.
        candidate = if_range.strip()
        if candidate.startswith((b'"', b"W/")):
            if candidate.startswith(b"W/") or candidate != etag:
                return whole
        elif last_modified is None or candidate != last_modified:
            return whole
    span = parse_range(range_header, size)
    if span is None:
        return whole
    if span == "unsatisfiable":
        return Plan(416)
    assert isinstance(span, tuple)
    return Plan(206, span[0], span[1])

"""The caching rules as a table: (request, answer, now) → (store?, kind, TTL, served?)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.policy import (
    CacheLimits,
    EntryKind,
    RequestDirectives,
    cache_key,
    decide,
    request_directives,
    reusable_answer,
    servable,
    tenant_fingerprint,
)

NOW = 1_000_000.0
LIMITS = CacheLimits(
    terminal_ttl_seconds=3600,
    max_ttl_seconds=86400,
    poll_coalesce_seconds=1.0,
    max_entry_bytes=1000,
)
NO_STORE = RequestDirectives(no_store=True)


@pytest.mark.parametrize(
    "status, doc, size, directives, expected",
    [
        # terminal with expires_at: TTL up to expires_at
        (
            200,
            {"status": "completed", "expires_at": NOW + 600},
            10,
            None,
            (EntryKind.TERMINAL, 600),
        ),
        (200, {"status": "failed", "expires_at": NOW + 5}, 10, None, (EntryKind.TERMINAL, 5)),
        # expires_at already passed, or right now: not stored
        (200, {"status": "completed", "expires_at": NOW - 1}, 10, None, None),
        (200, {"status": "completed", "expires_at": NOW}, 10, None, None),
        # no expires_at (Gemini, Runway, most failed jobs): terminal_ttl_seconds
        (200, {"status": "completed"}, 10, None, (EntryKind.TERMINAL, 3600)),
        (200, {"status": "failed", "expires_at": None}, 10, None, (EntryKind.TERMINAL, 3600)),
        (200, {"status": "failed", "expires_at": "soon"}, 10, None, (EntryKind.TERMINAL, 3600)),
        # capped by max_ttl_seconds
        (
            200,
            {"status": "completed", "expires_at": NOW + 10**9},
            10,
            None,
            (EntryKind.TERMINAL, 86400),
        ),
        # running jobs: only for the coalescing window
        (200, {"status": "queued"}, 10, None, (EntryKind.RUNNING, 1.0)),
        (
            200,
            {"status": "in_progress", "expires_at": NOW + 600},
            10,
            None,
            (EntryKind.RUNNING, 1.0),
        ),
        # never stored
        (200, {"status": "cancelled"}, 10, None, None),
        (200, {"status": None}, 10, None, None),
        (200, {}, 10, None, None),
        (200, None, 10, None, None),  # unparsable body
        (404, {"status": "completed"}, 10, None, None),
        (500, {"status": "completed"}, 10, None, None),
        (203, {"status": "completed"}, 10, None, None),
        (200, {"status": "completed"}, 1001, None, None),  # over max_entry_bytes
        (200, {"status": "completed"}, 10, NO_STORE, None),
        (200, {"status": "queued"}, 10, NO_STORE, None),
    ],
)
def test_store_decisions(
    status: int,
    doc: dict[str, Any] | None,
    size: int,
    directives: RequestDirectives | None,
    expected: tuple[EntryKind, float] | None,
) -> None:
    decision = decide(status, doc, size, NOW, LIMITS, directives or RequestDirectives())
    if expected is None:
        assert decision is None
    else:
        assert decision is not None
        assert (decision.kind, decision.deadline - NOW) == expected


def test_coalescing_off_stores_no_running_answers() -> None:
    limits = CacheLimits(poll_coalesce_seconds=0)
    assert decide(200, {"status": "queued"}, 10, NOW, limits) is None
    assert decide(200, {"status": "completed"}, 10, NOW, limits) is not None


@pytest.mark.parametrize(
    "deadline, now, served",
    [(NOW + 1, NOW, True), (NOW, NOW, False), (NOW - 1, NOW, False), (NOW + 0.001, NOW, True)],
)
def test_never_served_at_or_after_deadline(deadline: float, now: float, served: bool) -> None:
    assert servable(deadline, now) is served


@pytest.mark.parametrize(
    "header, no_store, no_cache",
    [
        (None, False, False),
        (b"no-cache", False, True),
        (b"No-Cache", False, True),
        (b"max-age=0", False, True),
        (b"no-store", True, False),
        (b"max-age=60, no-store", True, False),
        (b"max-age=60", False, False),
    ],
)
def test_request_directives(header: bytes | None, no_store: bool, no_cache: bool) -> None:
    d = request_directives(header)
    assert (d.no_store, d.no_cache) == (no_store, no_cache)


def test_tenant_fingerprints() -> None:
    secret = b"s" * 32
    alice = [(b"authorization", b"Bearer sk-bf-alice"), (b"accept", b"*/*")]
    alice_other_headers = [(b"Authorization", b"Bearer sk-bf-alice"), (b"user-agent", b"x")]
    bob = [(b"authorization", b"Bearer sk-bf-bob")]
    fp = tenant_fingerprint(alice, secret)
    assert fp == tenant_fingerprint(alice_other_headers, secret)
    assert fp != tenant_fingerprint(bob, secret)
    assert fp != tenant_fingerprint(alice, b"t" * 32)  # keyed: replicas must share the secret
    assert tenant_fingerprint([], secret) == tenant_fingerprint([(b"accept", b"x")], secret)
    assert tenant_fingerprint([], secret) != fp
    for header in (
        b"x-api-key",
        b"x-goog-api-key",
        b"x-bf-vk",
        b"x-bf-api-key",
        b"x-bf-api-key-id",
        b"x-bf-eh-org",
    ):
        assert tenant_fingerprint([(header, b"k")], secret) != tenant_fingerprint([], secret), (
            header
        )
    assert b"alice" not in fp.encode() and "sk-bf" not in cache_key("native", "v:openai", fp)


@pytest.mark.parametrize(
    "headers, reusable",
    [
        ([], True),
        ([(b"cache-control", b"max-age=60")], True),
        ([(b"cache-control", b"public, max-age=60")], True),
        ([(b"Cache-Control", b"no-store")], False),
        ([(b"cache-control", b"max-age=60, NO-CACHE")], False),
        ([(b"cache-control", b'private="x-bifrost-key"')], False),
        ([(b"cache-control", b"must-revalidate")], True),
        ([(b"set-cookie", b"s=1")], False),
        ([(b"Set-Cookie", b"s=1"), (b"cache-control", b"public")], False),
    ],
)
def test_upstream_answers_a_shared_cache_may_reuse(
    headers: list[tuple[bytes, bytes]], reusable: bool
) -> None:
    assert reusable_answer(headers) is reusable
    doc = {"status": "completed"}
    decision = decide(200, doc, 10, 1000.0, CacheLimits(), answer_headers=headers)
    assert (decision is not None) is reusable


@pytest.mark.parametrize("status", [["completed"], {"s": 1}, 7, None, True])
def test_a_status_that_is_not_a_string_is_never_stored(status: object) -> None:
    assert decide(200, {"status": status}, 10, 1000.0, CacheLimits()) is None

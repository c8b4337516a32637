"""The hit lane (issue 22): memoised HITs written by the HTTP protocol itself.

A keep-alive GET repeating a memoised HIT is answered in ``GuardedHttpToolsProtocol``
as soon as its headers are parsed, with no ASGI cycle. Everything it declines goes to
the ASGI door (``HotPathMiddleware``), which must give the same bytes. These tests use
raw sockets, so the bytes on the wire are what is compared, and pipelined requests are
really pipelined.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from proxy.app import create_app
from proxy.protocol import GuardedHttpToolsProtocol
from proxy.services import Services
from tests.conftest import Upstream, make_settings
from tests.rawhttp import closed_by_peer, connect, read_response
from tests.servers import serve_in_thread
from tests.test_cache import finish
from tests.test_proxy_core import ALICE, create

AUTH = b"Authorization: Bearer sk-bf-alice\r\n"


@contextmanager
def lane_proxy(upstream: Upstream, **uvicorn_config: Any) -> Iterator[tuple[str, Services]]:
    app = create_app(make_settings(upstream.url), clock=upstream.clock)
    config = {"http": GuardedHttpToolsProtocol, "ws": "none", **uvicorn_config}
    with serve_in_thread(app, **config) as server:
        yield server.url, app.state.services


def memoised(base: str, services: Services, upstream: Upstream) -> str:
    """A finished job's path, its answer memoised (MISS, then a HIT through ASGI)."""
    vid = finish(base, upstream)["id"]
    for expected in ("MISS", "HIT"):
        r = httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE)
        assert r.headers["x-cache-status"] == expected
    assert services.hot.slots
    return f"/v1/videos/{vid}"


def get(path: str, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET %s HTTP/%s\r\nHost: t\r\n%s%s\r\n" % (path.encode(), version, AUTH, extra)


def raw_answer(base: str, request: bytes) -> bytes:
    with connect(base) as sock:
        sock.sendall(request)
        r = read_response(sock)
        return r.head + b"\r\n\r\n" + r.body


@pytest.mark.parametrize("defaults", [False, True], ids=["console script", "uvicorn defaults"])
def test_the_lane_writes_the_bytes_the_asgi_door_sends(upstream: Upstream, defaults: bool) -> None:
    """Same status line, headers in the same order (uvicorn's default headers first
    when it has them), same body; only ``connection: close`` tells the doors apart."""
    uv = {} if defaults else {"server_header": False, "date_header": False}
    with lane_proxy(upstream, **uv) as (base, services):
        path = memoised(base, services, upstream)
        lanes = services.hot.wire_answers
        rid = b"X-Request-ID: rid-same\r\n"
        laned = raw_answer(base, get(path, rid))
        assert services.hot.wire_answers == lanes + 1
        door = raw_answer(base, get(path, rid + b"Connection: close\r\n"))
        assert services.hot.wire_answers == lanes + 1  # the ASGI door answered this one
    assert b"\r\nconnection: close" in door
    door = door.replace(b"\r\nconnection: close", b"")
    date = re.compile(rb"date: [^\r]+")
    assert date.sub(b"date: -", laned) == date.sub(b"date: -", door)
    # The upstream's own date and server are relayed; uvicorn's, when on, come first.
    assert laned.count(b"\r\ndate: ") == 1 + defaults
    assert laned.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-cache-status: HIT" in laned
    assert b"x-request-id: rid-same\r\n" in laned


def test_pipelined_answers_keep_their_order(upstream: Upstream) -> None:
    """A HIT pipelined behind a request still being answered waits its turn; the lane
    answers only when nothing is before it."""
    with lane_proxy(upstream) as (base, services):
        path = memoised(base, services, upstream)
        lanes = services.hot.wire_answers
        health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        with connect(base) as sock:
            sock.sendall(get(path) + health + get(path) + health + get(path))
            buffered = bytearray()
            answers = [read_response(sock, buffered) for _ in range(5)]
    kinds = [a.header(b"x-cache-status") or a.body for a in answers]
    assert kinds == [b"HIT", answers[1].body, b"HIT", answers[3].body, b"HIT"]
    assert b"x-cache-status" not in answers[1].head and answers[1].json()["status"] == "ok"
    # The first came through the lane; those behind a health check were queued for ASGI.
    assert services.hot.wire_answers == lanes + 1


def test_requests_the_lane_declines_are_answered_through_asgi(upstream: Upstream) -> None:
    with lane_proxy(upstream) as (base, services):
        path = memoised(base, services, upstream)
        lanes = services.hot.wire_answers
        for request in (
            get(path, b"Connection: close\r\n"),
            get(path, version=b"1.0"),
            get(path + "?x=1"),
            get(path, b"Cache-Control: no-cache\r\n"),
            get(path, b"Expect: 100-continue\r\n"),
            b"GET http://t%s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), AUTH),
        ):
            with connect(base) as sock:
                sock.sendall(request)
                r = read_response(sock)
            assert r.status == 200 and r.json()["status"] == "completed", request
        assert services.hot.wire_answers == lanes


def test_an_idle_connection_after_a_laned_hit_is_closed_at_the_keepalive_timeout(
    upstream: Upstream,
) -> None:
    """The lane re-arms uvicorn's keep-alive timer, as the end of any answer does."""
    with lane_proxy(upstream, timeout_keep_alive=1) as (base, services):
        path = memoised(base, services, upstream)
        lanes = services.hot.wire_answers
        with connect(base, timeout=10) as sock:
            sock.sendall(get(path))
            assert read_response(sock).header(b"x-cache-status") == b"HIT"
            assert services.hot.wire_answers == lanes + 1
            assert closed_by_peer(sock)  # within the socket's 10 s, not never


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@contextmanager
def protocol_on(app: Any) -> Iterator[tuple[GuardedHttpToolsProtocol, FakeTransport]]:
    """The protocol in this thread on a loop of its own: only its synchronous part
    (what happens while a request's bytes are parsed) is exercised."""
    loop = asyncio.new_event_loop()
    config = uvicorn.Config(
        app, http=GuardedHttpToolsProtocol, ws="none", lifespan="off", proxy_headers=False
    )
    config.load()
    state = ServerState()
    proto = GuardedHttpToolsProtocol(config, state, {}, _loop=loop)
    transport = FakeTransport()
    proto.connection_made(transport)
    try:
        yield proto, transport
    finally:
        for task in state.tasks:
            task.cancel()
        proto.connection_lost(None)
        loop.run_until_complete(asyncio.sleep(0))  # let the cancelled tasks finish
        loop.close()


def test_a_client_that_is_not_reading_is_not_answered_by_the_lane(upstream: Upstream) -> None:
    """While the transport's buffer is over its high-water mark the lane declines, so
    the ASGI door's ``send`` waits for the client (answers cannot pile up in memory)."""
    app = create_app(make_settings(upstream.url), clock=upstream.clock)
    with serve_in_thread(app, http=GuardedHttpToolsProtocol, ws="none") as server:
        services = app.state.services
        path = memoised(server.url, services, upstream)
        with protocol_on(app) as (proto, transport):
            proto.data_received(get(path))
            assert b"x-cache-status: HIT" in transport.written  # the lane answered
            assert proto.cycle is None  # without any ASGI cycle
            proto.pause_writing()
            before = len(transport.written)
            proto.data_received(get(path))
            assert len(transport.written) == before  # declined: nothing written now
            assert proto.cycle is not None and not proto.cycle.response_complete


def test_a_failing_lane_loses_no_request(upstream: Upstream, monkeypatch: Any) -> None:
    app = create_app(make_settings(upstream.url), clock=upstream.clock)
    with serve_in_thread(app, http=GuardedHttpToolsProtocol, ws="none") as server:
        services = app.state.services
        path = memoised(server.url, services, upstream)

        def broken(*args: Any) -> bool:
            raise RuntimeError("lane bug")

        monkeypatch.setattr(services.hot, "answer_wire", broken)
        with connect(server.url) as sock:
            sock.sendall(get(path))
            r = read_response(sock)
        assert r.status == 200 and r.header(b"x-cache-status") == b"HIT"


def test_a_socket_closed_right_after_the_request_costs_nothing(upstream: Upstream) -> None:
    """A client that sends a HIT request and hangs up at once: the lane writes into a
    closing transport without error, and the proxy serves the next client."""
    with lane_proxy(upstream) as (base, services):
        path = memoised(base, services, upstream)
        for _ in range(20):
            sock = connect(base)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(get(path))
            sock.close()  # RST at once
        r = httpx.get(base + path, headers=ALICE)
        assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT"


def test_a_laned_hit_pipelined_before_a_long_request_leaves_no_keepalive_timer_on_it(
    upstream: Upstream,
) -> None:
    """The lane arms the keep-alive timer as the end of an answer does; a request that
    came in the same read then runs in ASGI, and must not be cut off by that timer."""
    with lane_proxy(upstream, timeout_keep_alive=1) as (base, services):
        path = memoised(base, services, upstream)
        running = create(base)["id"]  # queued: a long-poll waits its whole 2 s
        long_poll = get(f"/v1/videos/{running}", b"Prefer: wait=2\r\n")
        with connect(base, timeout=10) as sock:
            sock.sendall(get(path) + long_poll)
            buffered = bytearray()
            assert read_response(sock, buffered).header(b"x-cache-status") == b"HIT"
            waited = read_response(sock, buffered)  # not a connection closed after 1 s
    assert waited.status == 200 and waited.header(b"preference-applied") == b"wait=2"

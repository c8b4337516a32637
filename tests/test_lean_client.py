"""The lean HTTP/1.1 client under plain upstream GETs (proxy/h1.py): keep-alive reuse,
a server's idle close, stray bytes, framing, and the bytes it writes."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy import h1
from tests.chaos import Chaos, chaos_upstream

VIDEO = "/v1/videos/video_{}:openai"


@pytest.fixture
def chaos() -> Iterator[Chaos]:
    with chaos_upstream() as upstream:
        yield upstream


def test_polls_reuse_one_keep_alive_connection(make_proxy: Any, chaos: Chaos) -> None:
    base = make_proxy(upstream_url=chaos.url, poll_coalesce_seconds=0)
    for n in range(5):  # distinct ids: five upstream calls
        r = httpx.get(base + VIDEO.format(n), headers={"Authorization": "Bearer a"})
        assert r.status_code == 200
    assert chaos.requests == 5 and chaos.connections == 1


def test_a_server_closing_an_idle_connection_costs_nothing(make_proxy: Any, chaos: Chaos) -> None:
    base = make_proxy(upstream_url=chaos.url, poll_coalesce_seconds=0)
    chaos.mode = "close_after"  # every answer whole, then the server hangs up
    for n in range(3):
        r = httpx.get(base + VIDEO.format(n), headers={"Authorization": "Bearer a"})
        assert r.status_code == 200, r.text
    assert chaos.requests == 3 and chaos.connections == 3  # never a 502 for a dead pool


def test_the_request_is_written_exactly() -> None:
    async def build() -> bytes:
        client = h1.LeanClient("http://bifrost:8080/prefix", 4)
        return client.request_bytes(
            "/v1/videos/a b", b"x=\xff&y=1", [(b"authorization", b"Bearer k")]
        )

    assert asyncio.run(build()) == (
        b"GET /prefix/v1/videos/a%20b?x=%FF&y=1 HTTP/1.1\r\nhost: bifrost:8080\r\n"
        b"authorization: Bearer k\r\n\r\n"
    )


class OneShot:
    """A raw-socket server that answers each connection with ``reply`` (bytes), then
    holds the connection open until told to stop."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.reply)
                self.done.wait(5)

    def close(self) -> None:
        self.done.set()
        self.listener.close()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", (200, b"{}")),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            (200, b"{}"),
        ),
        (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", (404, b"")),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", h1.Broken),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n", h1.Broken),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", h1.Broken),
        (b"NOT HTTP AT ALL\r\n\r\n", h1.Broken),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n" + b"x" * 99, h1.TooLarge),
    ],
)
def test_framing(reply: bytes, expected: Any) -> None:
    server = OneShot(reply)

    async def get() -> tuple[int, bytes]:
        client = h1.LeanClient(f"http://127.0.0.1:{server.port}", 4)
        try:
            async with asyncio.timeout(5):
                status, _, body = await client.get("/x", b"", [], 64, 2)
            return status, body
        finally:
            client.close()

    try:
        if isinstance(expected, tuple):
            assert asyncio.run(get()) == expected
        else:
            with pytest.raises(expected):
                asyncio.run(get())
    finally:
        server.close()


def test_a_stray_answer_behind_the_answer_closes_the_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    server = OneShot(answer + answer.replace(b"{}", b"[]"))  # two answers, one write

    async def twice() -> int:
        client = h1.LeanClient(f"http://127.0.0.1:{server.port}", 4)
        try:
            await client.get("/x", b"", [], 64, 2)
            return len(client.idle)
        finally:
            client.close()

    try:
        assert asyncio.run(twice()) == 0  # the polluted connection is not pooled
    finally:
        server.close()


def test_bytes_arriving_while_idle_are_seen_before_reuse() -> None:
    """The peek: bytes waiting in the kernel (the event loop has not read them yet)."""
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"

    async def check() -> bool:
        client = h1.LeanClient("http://127.0.0.1:1", 4)
        a, b = socket.socketpair()
        conn = h1._Connection()
        conn.sock, conn.transport = a, _OpenTransport()  # type: ignore[assignment]
        conn.idle_since = __import__("time").monotonic()
        assert conn.reusable()
        b.sendall(answer)  # a stray answer lands while the connection idles
        clean = conn.reusable()
        a.close(), b.close(), client.close()
        return clean

    assert asyncio.run(check()) is False


class _OpenTransport:
    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        pass

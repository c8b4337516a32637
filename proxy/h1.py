"""A lean HTTP/1.1 client for the upstream's small answers to plain GETs (retrieve,
list): one request out in one write, the answer parsed by ``httptools`` (llhttp, what
uvicorn parses requests with) and read whole, under one deadline per call.

Why not aiohttp for these: its request machinery (request and response objects, timer
handles, tracing hooks, stream readers) was the largest single cost of a cache miss
(~27 % of the CPU; see docs/performance.md). Everything else (bodies, streaming
downloads, pass-through) stays on aiohttp.

The security rules of the upstream edge hold here as there: a connection that has
received bytes nobody asked for (a stray answer, while idle or behind the answer) is
never reused, checked with a non-blocking peek at the socket before each reuse; an
answer that breaks framing (a short body, a bad chunk, conflicting lengths) fails the
call and closes its connection.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
import time
from urllib.parse import urlsplit

import httptools

IDLE_SECONDS = 15.0  # an idle pooled connection older than this is not reused
_UNSAFE = re.compile(rb"[\x00-\x20\x7f-\xff]")


class Refused(Exception):
    """No connection could be made (the request was never sent)."""


class Broken(Exception):
    """The answer broke framing or the connection failed mid-answer."""

    def __init__(self, reason: str, *, before_answer: bool = False) -> None:
        super().__init__(reason)
        self.before_answer = before_answer  # nothing of an answer arrived: safe to retry


class TooLarge(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One upstream connection: at most one exchange at a time, never pipelined."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset(0)

    def _reset(self, max_bytes: int) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.max_bytes = max_bytes
        self.begun = self.complete = self.headers_done = self.keep_alive = False

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.complete:
            self._fail(Broken("bytes nobody asked for"))  # never reused
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # An exception raised in a callback arrives wrapped, its cause as context.
            cause = exc.__context__
            self._fail(
                cause if isinstance(cause, (Broken, TooLarge)) else Broken(type(exc).__name__)
            )
        except (Broken, TooLarge) as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.headers_done and not self._framed():
                self._finish()  # a body delimited by the connection's close: complete
            else:
                self.waiter.set_exception(Broken("connection closed", before_answer=not self.begun))

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            raise Broken("a second answer behind the first")
        self.begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # (reset once complete)
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.max_bytes:
            raise TooLarge()

    def on_message_complete(self) -> None:
        self._finish()

    # -- the exchange -----------------------------------------------------------------------
    def _framed(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" in names or b"transfer-encoding" in names

    def _finish(self) -> None:
        self.complete = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def reusable(self) -> bool:
        """Idle, unpolluted and still open: no byte has arrived since the last answer
        (a peek at the socket, not the event loop's view, which may lag)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        if time.monotonic() - self.idle_since > IDLE_SECONDS:
            return False
        if self.transport.get_extra_info("sslcontext") is not None:
            # TLS: the socket carries records the TLS layer consumes (session tickets),
            # so a peek would refuse every connection; stray application bytes still
            # close it in data_received.
            return True
        if self.sock is None:
            return False
        try:
            peeked = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True  # nothing waiting: clean
        except OSError:
            return False
        del peeked  # bytes waiting, or b"" (the server closed): either way, not reusable
        return False

    async def exchange(self, request: bytes, max_bytes: int) -> None:
        assert self.transport is not None
        self._reset(max_bytes)
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            self.transport.write(request)
            await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LeanClient:
    """A pool of keep-alive connections to one upstream origin."""

    def __init__(self, base_url: str, max_connections: int) -> None:
        url = urlsplit(base_url)
        self.secure = url.scheme == "https"
        self.host = url.hostname or "localhost"
        self.port = url.port or (443 if self.secure else 80)
        default = (url.port is None) or url.port == (443 if self.secure else 80)
        self.host_header = (url.netloc.rpartition("@")[2] if not default else self.host).encode()
        self.prefix = url.path.rstrip("/")
        self.ssl = ssl.create_default_context() if self.secure else None
        self.idle: collections.deque[_Connection] = collections.deque()
        self.slots = asyncio.Semaphore(max_connections)

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        sock = None
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
                family, kind, proto, _, address = infos[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                _, conn = await loop.create_connection(
                    _Connection, sock=sock, ssl=self.ssl,
                    server_hostname=self.host if self.secure else None,
                )  # fmt: skip
        except (OSError, TimeoutError, ssl.SSLError, IndexError) as exc:
            if sock is not None:
                sock.close()
            raise Refused(type(exc).__name__) from None
        conn.sock = sock  # our own handle on the socket: the transport's cannot peek
        return conn

    def _pooled(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the likeliest still open
            if conn.reusable():
                return conn
            conn.close()
        return None

    def request_bytes(self, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        target = (self.prefix + path).encode("latin-1")
        if query:
            target += b"?" + query
        if _UNSAFE.search(target):  # never a space, control or 8-bit byte on the wire
            target = _UNSAFE.sub(lambda m: b"%%%02X" % m[0][0], target)
        lines = [b"GET ", target, b" HTTP/1.1\r\nhost: ", self.host_header, b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def get(
        self,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        max_bytes: int,
        connect_timeout: float,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One GET, answered whole: (status, raw headers, body). The caller bounds the
        whole call with one deadline (``asyncio.timeout``); a pooled connection that
        fails before any byte of an answer is retried once on a new one."""
        request = self.request_bytes(path, query, headers)
        async with self.slots:
            conn = self._pooled()
            reused = conn is not None
            while True:
                if conn is None:
                    conn = await self._connect(connect_timeout)
                try:
                    await conn.exchange(request, max_bytes)
                except Broken as exc:
                    conn.close()
                    if reused and exc.before_answer:  # a keep-alive the server had closed
                        conn, reused = None, False
                        continue
                    raise
                except BaseException:  # cancelled (the deadline), too large: never reused
                    conn.close()
                    raise
                break
            if conn.keep_alive and not conn.closed:
                conn.idle_since = time.monotonic()
                self.idle.append(conn)
            else:
                conn.close()
            return conn.status, conn.headers, bytes(conn.body)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()

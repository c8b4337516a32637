"""A misbehaving upstream on a real socket: one switchable fault mode at a time.

Raw asyncio (not an HTTP framework) so it can break HTTP the ways real networks do.
It records every request as a naive upstream reads it (honouring Content-Length and
chunked framing), so a request whose framing lies shows up as a wrong body or a
request nobody sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.rawhttp import header_in

JOB = b'{"id":"video_1:openai","object":"video","status":"completed","progress":100}'
MODES = (
    "normal",
    "refuse",
    "silent",
    "stall_after_headers",
    "trickle",
    "reset_mid_body",
    "short_body",
    "stray_later",  # answer, then (when released) a second answer nobody asked for
    "stray_same_write",  # answer and a second answer in one write
    "bad_status",  # HTTP/1.1 999
    "big_download",  # download_bytes of zeros, counted in sent_bytes
    "close_after",  # a whole keep-alive answer, then the connection closed (idle close)
)
STRAY = b'{"id":"victim_job:openai","object":"video","status":"completed","progress":100}'


@dataclass
class Seen:
    """One request as the upstream parsed it."""

    method: str
    target: str
    head: bytes  # request line and headers, raw
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return header_in(self.head, name)


@dataclass
class Chaos:
    port: int
    mode: str = "normal"
    body: bytes = JOB
    trickle_delay: float = 0.01
    requests: int = 0
    open_connections: int = 0
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    release_stray: threading.Event = field(default_factory=threading.Event)
    stray_sent: threading.Event = field(default_factory=threading.Event)
    extra_headers: bytes = b""  # more header lines (each ending CRLF) on normal answers
    download_bytes: int = 64 * 1024 * 1024
    sent_bytes: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                self.seen.append(await self.read_request(head, reader))
                if not await self.answer(writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            self.open_connections -= 1
            writer.transport.abort()

    @staticmethod
    async def read_request(head: bytes, reader: asyncio.StreamReader) -> Seen:
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        seen = Seen(method, target, head[:-4], b"")
        if (seen.header(b"transfer-encoding") or b"").lower() == b"chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                seen.body += await reader.readexactly(size)
                await reader.readexactly(2)
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
                pass
        elif length := int(seen.header(b"content-length") or 0):
            seen.body = await reader.readexactly(length)
        return seen

    async def answer(self, writer: asyncio.StreamWriter) -> bool:
        """Write one answer per the mode; False: the connection is done."""
        mode, body = self.mode, self.body
        json_head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        )
        if mode in ("stray_later", "stray_same_write"):
            self.mode = "normal"  # one stray answer, then behave
            stray = json_head % len(STRAY) + STRAY
            writer.write(json_head % 2 + b"{}" + (stray if mode == "stray_same_write" else b""))
            await writer.drain()
            if mode == "stray_later":  # once the proxy has the first answer and idles
                await asyncio.get_running_loop().run_in_executor(None, self.release_stray.wait)
                writer.write(stray)
                await writer.drain()
            self.stray_sent.set()
            return True
        if mode == "bad_status":
            writer.write(b"HTTP/1.1 999 Weird\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            return True
        if mode == "big_download":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\ncontent-length: %d\r\n\r\n"
                % self.download_bytes
            )
            chunk = b"\x00" * 65536
            for _ in range(self.download_bytes // len(chunk)):
                writer.write(chunk)
                await writer.drain()
                self.sent_bytes += len(chunk)
            return True
        ctype = b"application/json" if body.startswith(b"{") else b"video/mp4"
        head = b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ncontent-length: %d\r\n"
        head += self.extra_headers.replace(b"%", b"%%") + b"\r\n"
        if mode == "silent":
            await asyncio.sleep(3600)
        if mode == "stall_after_headers":
            writer.write(head % len(body))
            await writer.drain()
            await asyncio.sleep(3600)
        if mode == "trickle":
            writer.write(head % len(body))
            for i in range(len(body)):
                writer.write(body[i : i + 1])
                await writer.drain()
                await asyncio.sleep(self.trickle_delay)
            return True
        if mode == "reset_mid_body":
            writer.write(head % len(body) + body[: len(body) // 2])
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()
            return False
        if mode == "short_body":
            writer.write(head % (len(body) + 100) + body)
            await writer.drain()
            return False
        writer.write(head % len(body) + body)
        await writer.drain()
        return mode != "close_after"


@contextlib.contextmanager
def chaos_upstream() -> Iterator[Chaos]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    chaos = Chaos(sock.getsockname()[1])
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    handlers: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await chaos.handle(reader, writer)
        except asyncio.CancelledError:
            pass  # stopped at teardown: not an error worth asyncio's log line
        finally:
            handlers.discard(task)

    async def serve() -> None:
        server = await asyncio.start_server(tracked, sock=sock)
        started.set()
        await stop.wait()
        server.close()
        for task in list(handlers):  # e.g. handlers sleeping in "silent" mode
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    started.wait(5)
    try:
        yield chaos
    finally:
        chaos.release_stray.set()  # a handler may be waiting for it in a thread
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()

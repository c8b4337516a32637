"""A misbehaving upstream on a real socket: one switchable fault mode at a time.

Raw asyncio (not an HTTP framework) so it can break HTTP the ways real networks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

JOB = b'{"id":"video_1:openai","object":"video","status":"completed","progress":100}'
MODES = (
    "normal",
    "refuse",
    "silent",
    "stall_after_headers",
    "trickle",
    "reset_mid_body",
    "short_body",
)


@dataclass
class Chaos:
    port: int
    mode: str = "normal"
    body: bytes = JOB
    trickle_delay: float = 0.01
    requests: int = 0
    open_connections: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if not await self.answer(writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            self.open_connections -= 1
            writer.transport.abort()

    async def answer(self, writer: asyncio.StreamWriter) -> bool:
        """Write one answer per the mode; False: the connection is done."""
        mode, body = self.mode, self.body
        ctype = b"application/json" if body.startswith(b"{") else b"video/mp4"
        head = b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ncontent-length: %d\r\n\r\n"
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
        return True


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
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()

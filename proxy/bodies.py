"""Request bodies within limits: ``max_request_bytes`` (413) and
``client_body_timeout_seconds`` (408), read whole or streamed on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from .errors import ProxyError
from .exchange import Exchange

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


class BodyLimits:
    def __init__(self, max_bytes: int, timeout_seconds: float) -> None:
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds

    def too_large(self) -> ProxyError:
        return ProxyError(413, f"request body is larger than max_request_bytes ({self.max_bytes})")

    def check_declared(self, ex: Exchange) -> None:
        """413 at once when the declared Content-Length is already over the limit."""
        declared = ex.header(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    raise self.too_large()
            except ValueError:
                raise ProxyError(400, "invalid Content-Length header") from None

    async def next_message(self, receive: Receive) -> Message:
        """The next request-body message, within client_body_timeout_seconds."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await receive()
        except TimeoutError:
            raise ProxyError(
                408, "request body not received in time (client_body_timeout_seconds)"
            ) from None

    async def read(self, ex: Exchange, receive: Receive) -> bytes:
        """The whole request body."""
        self.check_declared(ex)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.next_message(receive)
            if message["type"] == "http.disconnect":
                raise ProxyError(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def limited(self, ex: Exchange, receive: Receive) -> Receive:
        """``receive``, refusing with 413 once the body passes the limit (for parsers)."""
        self.check_declared(ex)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await self.next_message(receive)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self.too_large()
            return message

        return limited_receive

    async def stream(
        self, receive: Receive, done: anyio.Event, failure: list[ProxyError]
    ) -> AsyncIterator[bytes]:
        """The body as it arrives, for pass-through.

        A failure is also put in ``failure``: the HTTP client wraps exceptions raised
        by a body iterator in its own, and the client must still hear the real cause.
        """
        size = 0
        try:
            while True:
                try:
                    message = await self.next_message(receive)
                except ProxyError as exc:
                    failure.append(exc)
                    raise
                if message["type"] == "http.disconnect":
                    failure.append(ProxyError(400, "client disconnected mid-body"))
                    raise failure[-1]
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    failure.append(self.too_large())
                    raise failure[-1]
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            done.set()

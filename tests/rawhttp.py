"""A raw-socket HTTP/1.1 client for hostile requests: bytes out exactly as written."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


def header_in(head: bytes, name: bytes) -> bytes | None:
    """A header's value in a raw head (start line, then header lines)."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@dataclass
class RawResponse:
    status: int
    head: bytes
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return header_in(self.head, name)

    def json(self) -> Any:
        return json.loads(self.body)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def connect(url: str, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(url)), timeout=timeout)


def read_response(sock: socket.socket, buffered: bytearray | None = None) -> RawResponse:
    """One response framed by Content-Length (what the proxy's own answers carry)."""
    data = buffered if buffered is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole head: {bytes(data)[:200]!r}")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    response = RawResponse(int(head.split(b" ", 2)[1]), head, b"")
    length = int(response.header(b"content-length") or 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    response.body = rest[:length]
    data[:] = rest[length:]
    return response


def exchange(url: str, request: bytes) -> RawResponse:
    """Send raw request bytes on a new connection; the first response."""
    with connect(url) as sock:
        sock.sendall(request)
        return read_response(sock)


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the peer closes (True) or the socket's timeout passes (False)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True

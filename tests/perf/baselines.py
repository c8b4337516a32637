"""Baselines the benchmark starts itself, served by uvicorn like the proxy.

- ``raw``: a raw ASGI callable returning the same bytes as a cache hit (the floor).
- ``bare``: a Starlette route returning the same bytes as a cache hit.
- ``reference``: a minimal Starlette pass-through on aiohttp's client.
- ``files``: a Starlette ``FileResponse`` of a video (ranges served by Starlette).
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_BODY_FILE = os.environ.get("BENCH_HIT_BODY")
BODY = Path(_BODY_FILE).read_bytes() if _BODY_FILE else b"{}"
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8080")


async def hit(request: Request) -> Response:
    return Response(BODY, media_type="application/json")


bare = Starlette(routes=[Route("/v1/videos/{video_id}", hit)])
_RAW_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def raw(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _RAW_HEADERS})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": BODY})  # type: ignore[operator]


_session: aiohttp.ClientSession | None = None


async def forward(request: Request) -> Response:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
    async with _session.get(UPSTREAM + request.url.path) as upstream:
        body = await upstream.read()
        return Response(body, upstream.status, media_type=upstream.content_type)


reference = Starlette(routes=[Route("/v1/videos/{video_id}", forward)])


_FILE = os.environ.get("BENCH_FILE", "")


async def file(request: Request) -> Response:
    from starlette.responses import FileResponse

    return FileResponse(_FILE, media_type="video/mp4")  # Range handled by Starlette


files = Starlette(routes=[Route("/v1/videos/{video_id}/content", file)])

"""Baselines the benchmark starts itself, served by uvicorn like the proxy.

- ``bare``: a Starlette route returning the same bytes as a cache hit.
- ``reference``: a minimal Starlette pass-through on aiohttp's client.
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

_session: aiohttp.ClientSession | None = None


async def forward(request: Request) -> Response:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
    async with _session.get(UPSTREAM + request.url.path) as upstream:
        body = await upstream.read()
        return Response(body, upstream.status, media_type=upstream.content_type)


reference = Starlette(routes=[Route("/v1/videos/{video_id}", forward)])

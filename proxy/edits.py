"""``POST …/videos/edits`` (Bifrost PR #6270): what the proxy must know of an edit body.

The body reaches Bifrost unchanged (JSON, or multipart with a ``video`` file or a
``video[id]`` field as the OpenAI SDKs send it); the proxy only reads the source video's
id, to validate it (400) and check its owner (404) before anything is sent, and the
provider, for metrics: the model's prefix, else the source id's, else ``?provider=``,
else the ``x-model-provider`` header, as Bifrost chooses it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from .decoy import ForeignJob
from .errors import ProxyError
from .ids import IdRules, InvalidVideoId, VideoId, normalize_provider, parse_decoded
from .multipart import MAX_FIELD_BYTES


async def form_fields(body: bytes, content_type: bytes) -> dict[str, Any]:
    """The text fields of a multipart body (files are left out: they are the bytes
    of a video to edit, which the proxy forwards and never needs to read)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type)]}
    request = Request(scope, receive)
    try:
        form = await request.form(max_files=16, max_fields=256, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise ProxyError(400, f"invalid multipart body: {exc.message}") from None
    except HTTPException as exc:
        raise ProxyError(400, f"invalid multipart body: {exc.detail}") from None
    try:
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                continue
            if name in fields:
                raise ProxyError(400, f"form field {name!r} given more than once", param=name)
            fields[name] = value
        return fields
    finally:
        await form.close()


def source_video(fields: dict[str, Any], rules: IdRules) -> tuple[VideoId, str] | None:
    """(the parsed id, as written) of the video an edit names, or None (a file or a
    URL); a malformed id is a 400 naming ``video.id``."""
    video = fields.get("video")
    written: Any = video.get("id") if isinstance(video, dict) else fields.get("video[id]")
    if written is None:
        return None
    if not isinstance(written, str):
        raise ProxyError(400, "video.id must be a string", param="video.id")
    try:
        return parse_decoded(written, rules), written
    except InvalidVideoId as exc:
        raise ProxyError(400, f"video.id: {exc}", param="video.id") from None


def with_decoy(body: bytes, written: str, foreign: ForeignJob) -> bytes:
    """The body with the source id replaced by its decoy; the proxy's own 404 when the
    id cannot be found once, verbatim, in the body (an escaped JSON string)."""
    needle = written.encode()
    if foreign.decoy is None or body.count(needle) != 1:
        raise foreign
    return body.replace(needle, foreign.decoy.video.canonical.encode())


def named_provider(query: bytes, header: bytes | None, rules: IdRules) -> str | None:
    """``?provider=`` or ``x-model-provider``, if well-formed (else left to Bifrost)."""
    named = [v for k, v in parse_qsl(query.decode("latin-1")) if k == "provider" and v]
    if not named and header:
        named = [header.decode("latin-1").strip()]
    try:
        return normalize_provider(named[0], rules) if named else None
    except InvalidVideoId:
        return None

"""Turn an OpenAI-SDK multipart create into the JSON body Bifrost's native route takes.

The SDK always sends ``multipart/form-data``; Bifrost's native ``POST /v1/videos``
parses JSON only. Text fields are copied as strings (``seconds`` stays a string), a
file part becomes a base64 data URL (``data:<content-type>;base64,…``). Parsing is
streamed by python-multipart (via Starlette), files spooled, not held twice.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .errors import ProxyError

MAX_FIELD_BYTES = 1024 * 1024  # one text field; files are bounded by max_request_bytes


async def to_json_body(request: Request) -> bytes:
    try:
        form = await request.form(max_files=16, max_fields=256, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise ProxyError(400, f"invalid multipart body: {exc.message}") from None
    fields: dict[str, Any] = {}
    try:
        for raw_name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                ctype = value.content_type or "application/octet-stream"
                value = f"data:{ctype};base64,{base64.b64encode(data).decode()}"
            name = raw_name.removesuffix("[]")
            if raw_name.endswith("[]") or name in fields:
                previous = fields.get(name, [])
                fields[name] = (
                    [*previous, value] if isinstance(previous, list) else [previous, value]
                )
            else:
                fields[name] = value
    finally:
        await form.close()
    return orjson.dumps(fields)

"""Turn an OpenAI-SDK multipart create into the JSON body Bifrost's native route takes.

The SDK always sends ``multipart/form-data``; Bifrost's native ``POST /v1/videos``
parses JSON into typed fields and answers 400 to a wrong JSON type. So each form field
gets the type Bifrost declares for it (``FIELD_TYPES``: ``seed`` an integer, ``audio`` a
boolean, ``extra_params`` an object, ``fallbacks`` an array; ``seconds`` stays a
string), unknown fields pass as strings, and a value that cannot be converted is a 400
naming the field. A file part becomes a base64 data URL (``data:<type>;base64,…``);
the SDKs' typed alternative to a file, ``input_reference[image_url]``, becomes
``input_reference``. The SDKs flatten nested objects into bracketed names
(``extra_params[style]``), which become nested objects again. Parsing is streamed by
python-multipart (via Starlette), files spooled, not held twice.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .errors import ProxyError

MAX_FIELD_BYTES = 1024 * 1024  # one text field; files are bounded by max_request_bytes
# JSON types of Bifrost's native create fields (core/schemas/videos.go); others: string.
FIELD_TYPES: dict[str, str] = {
    "seed": "integer",
    "audio": "boolean",
    "extra_params": "object",
    "fallbacks": "array",
}
_BRACKETED = re.compile(r"^([^\[\]]+)\[([^\[\]]*)\]$")  # name[key] or name[]
_INTEGER = re.compile(r"^-?[0-9]{1,19}$")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def _bad(name: str, wants: str) -> ProxyError:
    return ProxyError(400, f"form field {name!r} must be {wants}", param=name)


def typed(name: str, value: str) -> Any:
    """A text form field as the JSON value Bifrost's native create expects."""
    kind = FIELD_TYPES.get(name)
    if kind == "integer":
        if not _INTEGER.match(value.strip()):
            raise _bad(name, "an integer")
        return int(value)
    if kind == "boolean":
        if value.strip().lower() not in _BOOLEANS:
            raise _bad(name, "a boolean (true or false)")
        return _BOOLEANS[value.strip().lower()]
    if kind in ("object", "array"):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = None
        if kind == "object" and isinstance(parsed, dict):
            return parsed
        if kind == "array":
            return parsed if isinstance(parsed, list) else [value]
        raise _bad(name, "a JSON object")
    return value


async def _file_as_data_url(upload: UploadFile) -> str:
    data = await upload.read()
    ctype = upload.content_type or "application/octet-stream"
    return f"data:{ctype};base64,{base64.b64encode(data).decode()}"


async def to_json_body(request: Request) -> bytes:
    try:
        form = await request.form(max_files=16, max_fields=256, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise ProxyError(400, f"invalid multipart body: {exc.message}") from None
    except HTTPException as exc:  # Starlette's Request wraps parser errors in its own
        raise ProxyError(400, f"invalid multipart body: {exc.detail}") from None
    fields: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    image_url: str | None = None
    try:
        for raw_name, value in form.multi_items():
            bracketed = _BRACKETED.match(raw_name)
            if isinstance(value, UploadFile):
                if raw_name in fields:
                    raise ProxyError(400, f"form field {raw_name!r} given more than once")
                fields[raw_name] = await _file_as_data_url(value)
            elif raw_name == "input_reference[image_url]":
                image_url = value
            elif bracketed and bracketed.group(2):  # name[key]: a flattened object
                nested.setdefault(bracketed.group(1), {})[bracketed.group(2)] = value
            elif bracketed or FIELD_TYPES.get(raw_name) == "array":  # name[]: a list
                name = bracketed.group(1) if bracketed else raw_name
                items = fields.setdefault(name, [])
                if not isinstance(items, list):
                    raise ProxyError(400, f"form field {name!r} given more than once")
                items.extend(typed(name, value) if not bracketed else [value])
            elif raw_name in fields:
                raise ProxyError(400, f"form field {raw_name!r} given more than once")
            else:
                fields[raw_name] = typed(raw_name, value)
    finally:
        await form.close()
    for name, members in nested.items():
        if name in fields:
            raise ProxyError(400, f"form field {name!r} given more than once")
        fields[name] = members
    if image_url is not None:
        if "input_reference" in fields:
            raise ProxyError(
                400,
                "input_reference: give a file or an image_url, not both",
                param="input_reference",
            )
        fields["input_reference"] = image_url
    return orjson.dumps(fields)

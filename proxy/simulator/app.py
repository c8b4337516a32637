"""A stand-in for Bifrost's video routes, written from the upstream contract.

Jobs move queued → in_progress → completed/failed on a timeline measured from
creation with an injectable clock. Ids are provider-shaped and returned combined
(``PathEscape(native):provider``); jobs are visible only to the credentials that
created them. ``/_sim/stats`` counts the requests it received, so tests can assert
that the proxy rejected something with zero upstream calls.
"""

from __future__ import annotations

import base64
import hashlib
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

CREDENTIAL_HEADERS = (
    "authorization", "x-api-key", "x-goog-api-key", "x-bf-vk", "x-bf-api-key",
    "x-bf-api-key-id",
)  # fmt: skip
EXPIRING_PROVIDERS = {"openai", "azure"}
DEFAULT_MODEL = "gemini/veo-3.1-fast-generate-001"
VARIANT_TYPES = {
    "video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg",
    "sprite_sheet": "image/jpeg",  # Bifrost's own name for it
}  # fmt: skip
ALL_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]


@dataclass
class SimulatorConfig:
    queued_seconds: float = 2.0
    in_progress_seconds: float = 5.0
    expires_after_seconds: float = 3600.0  # expires_at = completed_at + this (openai/azure)
    content_bytes: int = 256 * 1024
    # One provider account behind Bifrost: every credential sees every job.
    shared_account: bool = False
    clock: Callable[[], float] = time.time


@dataclass
class Job:
    native: str
    provider: str
    owner: str
    model: str
    prompt: str
    created: float
    seconds: str = "4"
    size: str = "1280x720"
    remixed_from: str | None = None
    fail: bool = False
    filtered: bool = False  # Gemini's RAI filter: failed, error.code content_filtered

    @property
    def combined(self) -> str:
        return f"{quote(self.native, safe='$&+:=@')}:{self.provider}"


# JSON types of the native create's fields (Bifrost's core/schemas/videos.go).
_NATIVE_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "prompt": str, "size": str, "input_reference": str, "seconds": str,
    "negative_prompt": str, "video_uri": str, "seed": int, "audio": bool,
    "extra_params": dict, "fallbacks": list,
}  # fmt: skip


@dataclass
class Recorded:
    """One request as the simulator received it (for tests)."""

    method: str
    raw_path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class SimState:
    config: SimulatorConfig
    jobs: dict[tuple[str, str], Job] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    paths: list[str] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    # Faults for the next requests, applied in order: {"delay": s} sleeps first;
    # {"status": n, "body": b"…", "headers": {…}} answers that instead.
    faults: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.paths.clear()
        self.requests.clear()
        self.faults.clear()


def _error(status: int, message: str, etype: str = "invalid_request_error") -> Response:
    body = {
        "is_bifrost_error": False,
        "status_code": status,
        "error": {"type": etype, "message": message},
        "extra_fields": {},
    }
    return Response(orjson.dumps(body), status, media_type="application/json")


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """A JSON object body, or Bifrost's 400 for anything else."""
    try:
        fields = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error(400, "failed to parse request body: invalid JSON")
    if not isinstance(fields, dict):
        return _error(400, "request body must be a JSON object")
    return fields


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def _owner(request: Request) -> str:
    parts = [f"{h}={request.headers.get(h, '')}" for h in CREDENTIAL_HEADERS]
    parts += sorted(f"{k}={v}" for k, v in request.headers.items() if k.startswith("x-bf-eh-"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _new_native(provider: str, model: str) -> str:
    """A native id of the provider's real shape."""
    name = model.partition("/")[2] or "veo-3.1-fast-generate-001"
    if provider == "gemini":
        return f"models/{name}/operations/{random.randbytes(8).hex()}"
    if provider == "vertex":
        return (
            f"projects/sim-project/locations/us-central1/publishers/google/models/{name}"
            f"/operations/{random.getrandbits(63)}"
        )
    if provider in ("runway", "runware"):
        return str(uuid.UUID(bytes=random.randbytes(16), version=4))
    if provider == "replicate":
        return "".join(random.choices(string.ascii_lowercase + string.digits, k=26))
    return f"video_{random.randbytes(12).hex()}"


# What each live provider's video implementation supports in Bifrost (others: all).
UNSUPPORTED: dict[str, frozenset[str]] = {
    "runway": frozenset({"list", "remix", "edit"}),
    "runware": frozenset({"list", "remix", "delete"}),
    "gemini": frozenset({"edit"}),
    "vertex": frozenset({"edit"}),
    "replicate": frozenset({"edit"}),
}


def _unsupported(operation: str, provider: str) -> Response | None:
    if operation not in UNSUPPORTED.get(provider, frozenset()):
        return None
    body = {
        "is_bifrost_error": True,
        "status_code": 400,
        "error": {"type": "unsupported_operation",
                  "message": f"video {operation} is not supported by {provider} provider"},
        "extra_fields": {"provider": provider},
    }  # fmt: skip
    return Response(orjson.dumps(body), 400, media_type="application/json")


def parse_id(raw: str) -> tuple[str, str] | Response:
    """A path segment as Bifrost parses it: (native id, provider), or its 400."""
    try:
        once = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return _error(400, "invalid video_id encoding")
    if "%" in raw and any(
        len(p) < 2 or not all(c in "0123456789abcdefABCDEF" for c in p[:2])
        for p in raw.split("%")[1:]
    ):
        return _error(400, "invalid video_id encoding")
    native, sep, provider = once.partition(":")
    if not sep or not native or not provider:
        return _error(400, "video_id must be in id:provider format")
    return unquote(native), provider


class Simulator:
    def __init__(self, config: SimulatorConfig | None = None):
        self.state = SimState(config or SimulatorConfig())

    # -- job view -----------------------------------------------------------------
    def status_of(self, job: Job) -> tuple[str, float]:
        cfg = self.state.config
        elapsed = cfg.clock() - job.created
        if elapsed < cfg.queued_seconds:
            return "queued", 0.0
        if elapsed < cfg.queued_seconds + cfg.in_progress_seconds:
            done = (elapsed - cfg.queued_seconds) / max(cfg.in_progress_seconds, 1e-9)
            return "in_progress", round(min(99.0, 100.0 * done), 1)
        return ("failed" if job.fail else "completed"), 100.0

    def view(self, job: Job, *, listing: bool = False) -> dict[str, Any]:
        cfg = self.state.config
        status, progress = self.status_of(job)
        obj: dict[str, Any] = {
            "id": job.combined,
            "object": "video",
            "model": job.model,
            "status": status,
            "progress": progress,
            "prompt": job.prompt,
            "seconds": job.seconds,
            "size": job.size,
            "created_at": int(job.created),
        }
        if job.remixed_from:
            obj["remixed_from_video_id"] = job.remixed_from
        if status in ("completed", "failed"):
            completed = int(job.created + cfg.queued_seconds + cfg.in_progress_seconds)
            obj["completed_at"] = completed
            if job.provider in EXPIRING_PROVIDERS and status == "completed":
                obj["expires_at"] = int(completed + cfg.expires_after_seconds)
            if status == "failed" and job.filtered:
                obj["error"] = {"code": "content_filtered", "message": "blocked by the filter"}
                obj["content_filter"] = {"filtered_count": 1, "reasons": ["simulated RAI"]}
            elif status == "failed":
                obj["error"] = {"code": "generation_failed", "message": "simulated failure"}
            elif not listing:
                video = {"type": "video", "url": f"https://videos.example/{job.native}.mp4",
                         "content_type": "video/mp4"}  # fmt: skip
                if job.provider == "runware":
                    video["id"] = job.native
                obj["videos"] = [video]
            if job.provider == "runware" and status == "completed":
                obj["usage"] = {"cost": round(0.0125 * int(job.seconds or 4), 4)}
        obj["extra_fields"] = {
            "request_type": "video_retrieve",
            "provider": job.provider,
            "model_requested": job.model.partition("/")[2] or job.model,
            "latency": random.randint(50, 900),
        }
        return obj

    def visible(self, job: Job, owner: str) -> bool:
        return self.state.config.shared_account or job.owner == owner

    def find(self, request: Request, raw: str) -> Job | Response:
        parsed = parse_id(raw)
        if isinstance(parsed, Response):
            return parsed
        job = self.state.jobs.get(parsed)
        if job is None or not self.visible(job, _owner(request)):
            return _error(404, f"video {raw} not found", "not_found_error")
        return job

    # -- the one ASGI entry ------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        raw_path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        st = self.state
        if raw_path.startswith("/_sim/"):
            return self.admin(raw_path)
        st.calls[request.method] += 1
        st.paths.append(raw_path)
        body = await request.body()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        st.requests.append(
            Recorded(request.method, raw_path, request.url.query, headers, body[: 1 << 20])
        )
        del st.requests[:-500]
        if st.faults:
            fault = st.faults.pop(0)
            if fault.get("delay"):
                await anyio.sleep(fault["delay"])
            if "status" in fault:
                return Response(
                    fault.get("body", b""), fault["status"], headers=fault.get("headers")
                )
        if raw_path.startswith("/openai/v1/videos"):
            family, rest = "openai", raw_path[len("/openai/v1/videos") :]
        elif raw_path.startswith("/v1/videos"):
            family, rest = "native", raw_path[len("/v1/videos") :]
        else:
            return _error(404, f"no route {request.method} {raw_path}", "not_found_error")
        parts = rest.split("/")[1:] if rest else []
        method = request.method
        if not parts and method == "POST":
            return await self.create(request, family)
        if not parts and method == "GET":
            return self.list(request, family)
        if parts == ["edits"] and method == "POST":
            return await self.edit(request)
        if len(parts) == 1 and method in ("GET", "DELETE"):
            job = self.find(request, parts[0])
            if isinstance(job, Response):
                return job
            if method == "GET":
                return _json(self.view(job))
            if (refused := _unsupported("delete", job.provider)) is not None:
                return refused
            del st.jobs[(job.native, job.provider)]
            st.order.remove((job.native, job.provider))
            return _json(
                {"id": job.combined, "object": "video.deleted", "deleted": True,
                 "extra_fields": {"request_type": "video_delete", "provider": job.provider}}
            )  # fmt: skip
        if len(parts) == 2 and parts[1] == "remix" and method == "POST":
            return await self.remix(request, parts[0])
        if len(parts) == 2 and parts[1] == "content" and method == "GET":
            return self.content(request, parts[0])
        return _error(404, f"no route {method} {raw_path}", "not_found_error")

    def admin(self, raw_path: str) -> Response:
        if raw_path == "/_sim/reset":
            self.state.reset()
        return _json(
            {"calls": dict(self.state.calls), "total": sum(self.state.calls.values()),
             "paths": self.state.paths[-200:], "jobs": len(self.state.jobs)}
        )  # fmt: skip

    def _add(self, request: Request, fields: dict[str, Any], remixed_from: str | None) -> Job:
        model = str(fields.get("model") or DEFAULT_MODEL)
        # A model without a provider prefix is OpenAI's, as on Bifrost's OpenAI route.
        provider = model.partition("/")[0] if "/" in model else "openai"
        prompt = str(fields["prompt"])
        job = Job(
            native=_new_native(provider, model),
            provider=provider,
            owner=_owner(request),
            model=model,
            prompt=prompt,
            created=self.state.config.clock(),
            seconds=str(fields.get("seconds") or "4"),
            size=str(fields.get("size") or "1280x720"),
            remixed_from=remixed_from,
            fail="fail" in prompt.lower() or "unsafe" in prompt.lower(),
            filtered=provider in ("gemini", "vertex") and "unsafe" in prompt.lower(),
        )
        key = (job.native, job.provider)
        self.state.jobs[key] = job
        self.state.order.append(key)
        return job

    async def create(self, request: Request, family: str) -> Response:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            if family == "native":
                return _error(400, "failed to parse request body: invalid JSON")
            form = await request.form()
            fields: dict[str, Any] = {}
            for k, v in form.multi_items():
                if isinstance(v, str):
                    fields[k] = v
                else:
                    data = await v.read()
                    ctype = v.content_type or "application/octet-stream"
                    fields[k] = f"data:{ctype};base64,{base64.b64encode(data).decode()}"
        else:
            parsed = await _json_object(request)
            if isinstance(parsed, Response):
                return parsed
            fields = parsed
            for name, value in fields.items():  # Bifrost decodes into typed Go fields
                if not isinstance(value, _NATIVE_TYPES.get(name, object)) or (
                    name == "seed" and isinstance(value, bool)
                ):
                    return _error(400, "invalid request format")
        if not fields.get("prompt"):
            return _error(400, "prompt is required")
        ref = fields.get("input_reference")
        if ref is not None and not (
            isinstance(ref, str) and ref.startswith(("data:", "https://", "http://"))
        ):
            return _error(400, "input_reference must be a URL or a base64 data URL")
        job = self._add(request, fields, None)
        return _json(self.view(job))

    async def remix(self, request: Request, raw: str) -> Response:
        source = self.find(request, raw)
        if isinstance(source, Response):
            return source
        if (refused := _unsupported("remix", source.provider)) is not None:
            return refused
        try:
            fields = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "failed to parse request body: invalid JSON")
        if not isinstance(fields, dict) or not fields.get("prompt"):
            return _error(400, "prompt is required")
        job = self._add(
            request, {"model": source.model, "prompt": fields["prompt"]}, source.combined
        )
        return _json(self.view(job))

    async def edit(self, request: Request) -> Response:
        """Bifrost's edits route: JSON or multipart, the source by ``video.id``."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            if "video[id]" in fields:
                fields["video"] = {"id": fields.pop("video[id]")}
            elif "video" in form:
                fields["video"] = {"url": "uploaded"}
        else:
            parsed = await _json_object(request)
            if isinstance(parsed, Response):
                return parsed
            fields = parsed
        if not fields.get("prompt"):
            return _error(400, "prompt is required")
        video = fields.get("video")
        source_id = video.get("id") if isinstance(video, dict) else None
        source: Job | None = None
        if isinstance(source_id, str):
            found = self.find(request, quote(source_id, safe="$&+:=@%"))
            if isinstance(found, Response):
                return found
            source = found
        elif not (isinstance(video, dict) and video.get("url")):
            return _error(400, "video is required: an id or a url")
        model = fields.get("model")
        provider = (
            model.partition("/")[0] if isinstance(model, str) and "/" in model
            else source.provider if source is not None
            else request.query_params.get("provider") or request.headers.get("x-model-provider")
        )  # fmt: skip
        if not provider:
            return _error(400, "provider is required")
        if (refused := _unsupported("edit", provider)) is not None:
            return refused
        if not (isinstance(model, str) and "/" in model):
            model = source.model if source is not None else f"{provider}/edit"
        job = self._add(request, {"model": model, "prompt": fields["prompt"]}, None)
        return _json(self.view(job))

    def list(self, request: Request, family: str) -> Response:
        query = parse_qs(request.url.query)
        if family == "openai":
            provider = request.headers.get("x-bf-video-list-provider", "openai")
        else:
            provider = (query.get("provider") or [""])[0]
            if not provider:
                return _error(400, "provider is required")
        try:
            limit = int((query.get("limit") or ["20"])[0])
        except ValueError:
            return _error(400, "limit must be an integer")
        if (refused := _unsupported("list", provider)) is not None:
            return refused
        order = (query.get("order") or ["desc"])[0]
        owner = _owner(request)
        keys = [k for k in self.state.order if k[1] == provider]
        jobs = [self.state.jobs[k] for k in keys if self.visible(self.state.jobs[k], owner)]
        if order == "desc":
            jobs.reverse()
        after = (query.get("after") or [""])[0]
        if after:
            native = unquote(after.partition(":")[0]) if ":" in after else after
            idx = next((i for i, j in enumerate(jobs) if j.native == native), None)
            jobs = jobs[idx + 1 :] if idx is not None else []
        page = jobs[:limit]
        data = [self.view(j, listing=True) for j in page]
        return _json(
            {"object": "list", "data": data,
             "first_id": data[0]["id"] if data else None,
             "last_id": data[-1]["id"] if data else None,
             "has_more": len(jobs) > limit,
             "extra_fields": {"request_type": "video_list", "provider": provider}}
        )  # fmt: skip

    def content(self, request: Request, raw: str) -> Response:
        job = self.find(request, raw)
        if isinstance(job, Response):
            return job
        if self.status_of(job)[0] != "completed":
            return _error(400, "video is not ready: content is available once completed")
        variant = (parse_qs(request.url.query).get("variant") or ["video"])[0]
        if variant not in VARIANT_TYPES:
            return _error(400, f"invalid variant {variant!r}")
        size = self.state.config.content_bytes
        seed = hashlib.sha256(f"{job.native}/{variant}".encode()).digest() * 2048  # 64 KiB

        async def chunks() -> AsyncIterator[bytes]:
            left = size
            while left > 0:
                piece = seed[: min(left, len(seed))]
                left -= len(piece)
                yield piece

        return StreamingResponse(
            chunks(),
            media_type=VARIANT_TYPES[variant],
            headers={"content-length": str(size)},
        )


def expected_content(native: str, variant: str, size: int) -> bytes:
    """The bytes the simulator serves for a job's variant (for tests)."""
    seed = hashlib.sha256(f"{native}/{variant}".encode()).digest() * 2048
    return (seed * (size // len(seed) + 1))[:size]


def create_simulator(config: SimulatorConfig | None = None) -> Starlette:
    sim = Simulator(config)
    app = Starlette(routes=[Route("/{path:path}", sim.dispatch, methods=ALL_METHODS)])
    app.state.simulator = sim
    return app

"""Settings: one table, layered defaults < config file < PROXY_* env < CLI flags.

Every setting is declared once in ``SPECS`` (name, type, default, meaning); the
TOML file ``config/default.toml`` and the README's settings table mirror it, and a
test keeps them in sync.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .ids import PROVIDER_RE, IdRules

MiB = 1024 * 1024


class SettingsError(ValueError):
    """An invalid setting; the message names it and the problem, on one line."""


@dataclass(slots=True)
class Settings:
    upstream_url: str = "http://localhost:8080"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"
    upstream_timeout_seconds: float = 30.0
    upstream_connect_timeout_seconds: float = 5.0
    content_timeout_seconds: float = 60.0
    upstream_max_connections: int = 512
    upstream_client: str = "aiohttp"
    max_request_bytes: int = 64 * MiB
    client_body_timeout_seconds: float = 30.0
    client_header_timeout_seconds: float = 30.0
    max_header_bytes: int = 64 * 1024
    keepalive_timeout_seconds: float = 75.0
    max_id_length: int = 512
    allowed_providers: list[str] = field(default_factory=lambda: ["*"])
    provider_aliases: dict[str, str] = field(default_factory=dict)
    list_default_provider: str = "gemini"
    shutdown_grace_seconds: float = 30.0
    cache_backend: str = "memory"
    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_seconds: float = 0.05
    cache_key_secret: str = ""
    poll_coalesce_seconds: float = 1.0
    terminal_ttl_seconds: float = 3600.0
    max_ttl_seconds: float = 7 * 24 * 3600.0
    cache_max_bytes: int = 256 * MiB
    cache_max_entry_bytes: int = 1 * MiB
    max_wait_seconds: float = 60.0
    max_waiters: int = 10000
    max_waiters_per_tenant: int = 2500
    sse_keepalive_seconds: float = 15.0
    sse_send_timeout_seconds: float = 60.0
    stale_if_error_seconds: float = 60.0
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_poll_seconds: float = 5.0
    webhook_follow_max_seconds: float = 6 * 3600.0
    webhook_timeout_seconds: float = 10.0
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,36000"
    webhook_all_jobs: bool = False
    # name -> {url, secrets (or secret), events (optional)}; config file (or JSON in env)
    webhook_endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency_ttl_seconds: float = 24 * 3600.0
    idempotency_max_bytes: int = 64 * MiB
    idempotency_tenant_share: float = 0.25
    ownership_max_bytes: int = 32 * MiB
    max_running_jobs_per_tenant: int = 0
    running_job_max_seconds: float = 3600.0
    max_video_seconds_per_tenant: float = 0.0
    budget_window_seconds: float = 86400.0
    default_video_seconds: float = 8.0
    budget_fail_open: bool = True
    budget_tenant_header: str = ""
    # key (the tenant header's value, or a credential's SHA-256 hex) -> limits
    budget_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    enforce_job_ownership: bool = True
    job_ownership_strict: bool = False
    ownership_header: str = ""
    admin_token: str = ""
    metrics_port: int = 0
    content_cache: str = "disk"
    content_dir: str = ""
    content_max_bytes: int = 1024 * MiB
    content_s3_url: str = ""
    content_s3_endpoint: str = ""
    content_retention_seconds: float = 0.0
    content_prefetch: bool = False
    content_max_fills: int = 8

    def id_rules(self) -> IdRules:
        allowed = None if "*" in self.allowed_providers else frozenset(self.allowed_providers)
        return IdRules(
            max_length=self.max_id_length,
            allowed_providers=allowed,
            provider_aliases=dict(self.provider_aliases),
        )

    def effective_cache_key_secret(self) -> bytes:
        """The HMAC key for tenant fingerprints; random per process if unset."""
        if self.cache_key_secret:
            return self.cache_key_secret.encode()
        return _PROCESS_SECRET


_PROCESS_SECRET = secrets.token_bytes(32)

# Meanings, for --help, the README table and the TOML comments.
HELP: dict[str, str] = {
    "upstream_url": "Base URL of Bifrost (scheme, host, port, optional path prefix).",
    "host": "Interface to listen on (the Docker image uses 0.0.0.0).",
    "port": "Port to listen on.",
    "workers": "Worker processes (uvicorn). Metrics are summed over workers.",
    "log_level": "debug, info, warning, error or critical.",
    "log_format": "Access log format: json (one object per line) or text.",
    "upstream_timeout_seconds": "Total time allowed for an upstream JSON call; then 504.",
    "upstream_connect_timeout_seconds": "Time allowed to connect to the upstream; then 502.",
    "content_timeout_seconds": "Longest idle gap while streaming a content download.",
    "upstream_max_connections": "Connection pool size towards the upstream.",
    "upstream_client": "HTTP client under the upstream seam: aiohttp (fast) or httpx.",
    "max_request_bytes": "Largest request body accepted; larger ones get 413.",
    "client_body_timeout_seconds": "Longest wait for the next piece of a request body; then 408.",
    "client_header_timeout_seconds": "Longest wait for a request's complete headers; then 408.",
    "max_header_bytes": "Largest request line plus headers accepted; larger ones get 431.",
    "keepalive_timeout_seconds": "How long an idle client connection is kept open.",
    "max_id_length": "Longest video id accepted (raw path segment), else 400.",
    "allowed_providers": 'Providers accepted in ids and list queries; ["*"] (default): any.',
    "provider_aliases": 'Provider renames applied before validation, e.g. {google = "gemini"}.',
    "list_default_provider": "Provider filled into a native list without one; empty: off.",
    "shutdown_grace_seconds": "On SIGTERM, how long in-flight requests may finish.",
    "cache_backend": "memory (per process) or redis (shared by workers and replicas).",
    "redis_url": "Redis URL for the redis backend.",
    "redis_timeout_seconds": "Per-operation Redis timeout; on expiry the cache is skipped.",
    "cache_key_secret": "HMAC key for tenant fingerprints; required with redis.",
    "poll_coalesce_seconds": "Answer polls of running jobs from an answer this young; 0: off.",
    "terminal_ttl_seconds": "TTL of terminal answers that carry no expires_at.",
    "max_ttl_seconds": "Upper bound of every cache TTL.",
    "cache_max_bytes": "Memory backend: total bytes of cached bodies (LRU beyond).",
    "cache_max_entry_bytes": "Largest answer that is cached; larger ones pass unstored.",
    "max_wait_seconds": "Longest long-poll wait (Prefer: wait=N is capped to it).",
    "max_waiters": "Most clients waiting at once; past it a long-poll is a plain poll.",
    "max_waiters_per_tenant": "Most waiting clients one tenant may hold (of max_waiters).",
    "sse_keepalive_seconds": "Interval of keepalive comments on SSE status streams.",
    "sse_send_timeout_seconds": "An SSE stream whose reader takes no data this long is closed.",
    "stale_if_error_seconds": "Upstream failing: serve a running job's snapshot this old; 0: off.",
    "webhook_url": "Endpoint 'default' for job webhooks (X-Proxy-Webhook: default); empty: off.",
    "webhook_secret": "Signing secret of the default endpoint (whsec_…, Standard Webhooks).",
    "webhook_poll_seconds": "How often a job followed for a webhook is polled.",
    "webhook_follow_max_seconds": "How long a job is followed before it is given up.",
    "webhook_timeout_seconds": "Time allowed for one webhook delivery attempt.",
    "webhook_retry_schedule": "Seconds between delivery retries, comma-separated.",
    "webhook_all_jobs": "Follow every job created through the proxy with endpoint 'default'.",
    "webhook_endpoints": "More endpoints: {url, secrets = [whsec_…], events = […], tenants = […]}.",
    "idempotency_ttl_seconds": "How long a create's answer is replayed for its Idempotency-Key.",
    "idempotency_max_bytes": "Memory/host store: bytes of idempotency records (never evicted).",
    "idempotency_tenant_share": "Largest share of idempotency_max_bytes one tenant may hold.",
    "ownership_max_bytes": "Memory/host store: bytes of job-ownership records (LRU beyond).",
    "max_running_jobs_per_tenant": "Most jobs a tenant may have running (not ended); 0: off.",
    "running_job_max_seconds": "A job stops counting as running this long after its create.",
    "max_video_seconds_per_tenant": "Most seconds of video a tenant may ask per window; 0: off.",
    "budget_window_seconds": "The sliding window of max_video_seconds_per_tenant.",
    "default_video_seconds": "Seconds reserved for a create that names none (then its answer's).",
    "budget_fail_open": "Budget store down: forward creates unchecked (true, counted) or 503.",
    "budget_tenant_header": "A header whose value can name a tenant's budget override.",
    "budget_overrides": "Per-tenant limits: {KEY = {max_running_jobs, max_video_seconds}}.",
    "enforce_job_ownership": "Only the tenant that created a job may address it; others get 404.",
    "job_ownership_strict": "Also refuse jobs the proxy has no owner record of (404).",
    "ownership_header": "A header that is part of the owner (e.g. x-end-user-id); empty: off.",
    "admin_token": "Bearer token enabling DELETE /admin/cache…; empty: disabled.",
    "metrics_port": "Also serve /metrics on this port (0: only on the main port).",
    "content_cache": "Where downloaded videos are stored: disk, s3, or off (always relay).",
    "content_dir": "Disk store (and S3 spool) directory; empty: ~/.cache/bifrost-video-proxy.",
    "content_max_bytes": "Disk: bytes of stored videos and spool files (LRU beyond them).",
    "content_s3_url": "S3 store: s3://bucket/prefix (credentials: the AWS_* environment).",
    "content_s3_endpoint": "S3-compatible server URL (path-style), e.g. http://minio:9000.",
    "content_retention_seconds": "0: keep until the job's expires_at; >0: this long after done.",
    "content_prefetch": "Download a job's video into the store when it is seen completed.",
    "content_max_fills": "Most videos being stored at once; past it downloads are relayed.",
}

_BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_CHOICES = {
    "log_level": {"debug", "info", "warning", "error", "critical"},
    "log_format": {"json", "text"},
    "cache_backend": {"memory", "redis"},
    "upstream_client": {"aiohttp", "httpx"},
    "content_cache": {"disk", "s3", "off"},
}


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Convert a TOML/env/CLI value to the field's type, or raise SettingsError."""
    try:
        if kind == "bool" or kind is bool:
            if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
                return _BOOLEANS[value.strip().lower()]
            if not isinstance(value, bool):
                raise ValueError
            return value
        if str(kind).startswith("dict[str, dict"):
            if isinstance(value, str):  # the environment: JSON text
                value = json.loads(value)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in value.items()
            ):
                raise ValueError
            return {k: dict(v) for k, v in value.items()}
        if kind == "int" or kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float" or kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str" or kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if str(kind).startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if str(kind).startswith("dict"):
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        if "webhook" in name:  # may hold a secret: never echo the value
            raise SettingsError(f"{name}: expected {kind}") from None
        raise SettingsError(f"{name}: expected {kind}, got {value!r}") from None
    raise SettingsError(f"{name}: unsupported type {kind}")  # pragma: no cover


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(Settings)}


def load(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings from the layers, highest precedence last."""
    env = os.environ if env is None else env
    types = _field_types()
    settings = Settings()
    path = config_file or env.get("PROXY_CONFIG")
    if path:
        try:
            table = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise SettingsError(f"config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config: {path} is not valid TOML: {exc}") from None
        for name, value in table.items():
            if name not in types:
                raise SettingsError(f"{name}: unknown setting in {path}")
            setattr(settings, name, _coerce(name, types[name], value))
    for name, kind in types.items():
        raw = env.get(f"PROXY_{name.upper()}")
        if raw is not None:
            setattr(settings, name, _coerce(f"PROXY_{name.upper()}", kind, raw))
    for name, value in (overrides or {}).items():
        if value is not None:
            setattr(settings, name, _coerce(name, types[name], value))
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Raise SettingsError naming the first invalid setting."""
    url = urlsplit(s.upstream_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(f"upstream_url: must be an http(s) URL, got {s.upstream_url!r}")
    try:
        url.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise SettingsError("upstream_url: invalid port") from None
    if not 0 < s.port < 65536:
        raise SettingsError(f"port: must be 1..65535, got {s.port}")
    if not 0 <= s.metrics_port < 65536 or (s.metrics_port and s.metrics_port == s.port):
        raise SettingsError(
            f"metrics_port: must be 0 or a port other than port, got {s.metrics_port}"
        )
    if s.workers < 1:
        raise SettingsError(f"workers: must be >= 1, got {s.workers}")
    for name, choices in _CHOICES.items():
        value = getattr(s, name)
        if value not in choices:
            raise SettingsError(f"{name}: must be one of {sorted(choices)}, got {value!r}")
    positive = (
        "upstream_timeout_seconds", "upstream_connect_timeout_seconds",
        "content_timeout_seconds", "redis_timeout_seconds", "max_ttl_seconds",
        "client_body_timeout_seconds", "client_header_timeout_seconds",
        "max_header_bytes", "keepalive_timeout_seconds", "max_wait_seconds", "max_waiters",
        "sse_keepalive_seconds", "webhook_poll_seconds", "webhook_follow_max_seconds",
        "webhook_timeout_seconds", "idempotency_ttl_seconds", "idempotency_max_bytes",
        "ownership_max_bytes", "max_waiters_per_tenant", "sse_send_timeout_seconds",
        "running_job_max_seconds", "budget_window_seconds", "default_video_seconds",
        "max_request_bytes", "max_id_length", "cache_max_bytes",
        "cache_max_entry_bytes", "upstream_max_connections", "content_max_bytes",
        "content_max_fills",
    )  # fmt: skip
    for name in positive:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{name}: must be > 0, got {getattr(s, name)}")
    for name in (
        "poll_coalesce_seconds", "terminal_ttl_seconds", "shutdown_grace_seconds",
        "stale_if_error_seconds", "max_running_jobs_per_tenant", "max_video_seconds_per_tenant",
        "content_retention_seconds",
    ):  # fmt: skip
        if getattr(s, name) < 0:
            raise SettingsError(f"{name}: must be >= 0, got {getattr(s, name)}")
    if not 0 < s.idempotency_tenant_share <= 1:
        raise SettingsError(
            f"idempotency_tenant_share: must be in (0, 1], got {s.idempotency_tenant_share}"
        )
    if not s.allowed_providers:
        raise SettingsError('allowed_providers: must not be empty (use ["*"] for any)')
    for p in s.allowed_providers:
        if p != "*" and not PROVIDER_RE.fullmatch(p):
            raise SettingsError(f"allowed_providers: {p!r} is not a valid provider name")
    for alias, target in s.provider_aliases.items():
        if not PROVIDER_RE.fullmatch(alias.lower()) or not PROVIDER_RE.fullmatch(target):
            raise SettingsError(f"provider_aliases: {alias!r} = {target!r} is not valid")
    if s.list_default_provider and not PROVIDER_RE.fullmatch(s.list_default_provider):
        raise SettingsError(f"list_default_provider: {s.list_default_provider!r} is not valid")
    validate_webhooks(s)
    if s.budget_tenant_header and not HEADER_NAME_RE.fullmatch(s.budget_tenant_header):
        raise SettingsError(f"budget_tenant_header: {s.budget_tenant_header!r} is not a header")
    for key, spec in s.budget_overrides.items():
        if set(spec) - {"max_running_jobs", "max_video_seconds"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in spec.values()
        ):
            raise SettingsError(
                f"budget_overrides.{key}: max_running_jobs and max_video_seconds, numbers >= 0"
            )
    if s.ownership_header and not HEADER_NAME_RE.fullmatch(s.ownership_header):
        raise SettingsError(f"ownership_header: {s.ownership_header!r} is not a header name")
    if s.cache_backend == "redis":
        if not s.cache_key_secret:
            raise SettingsError(
                "cache_key_secret: required with cache_backend = redis, so replicas agree"
            )
        if urlsplit(s.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError("redis_url: must be a redis://, rediss:// or unix:// URL")
    if s.content_cache == "s3":
        bucket = urlsplit(s.content_s3_url)
        if bucket.scheme != "s3" or not bucket.netloc or bucket.query or bucket.fragment:
            raise SettingsError(
                f"content_s3_url: must be s3://bucket or s3://bucket/prefix, got "
                f"{s.content_s3_url!r}"
            )
        if not s.cache_key_secret:
            raise SettingsError(
                "cache_key_secret: required with content_cache = s3, so replicas agree"
            )
    if s.content_s3_endpoint:
        endpoint = urlsplit(s.content_s3_endpoint)
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise SettingsError("content_s3_endpoint: must be an http(s) URL")
        if endpoint.username or endpoint.password:
            raise SettingsError(  # never echoed: it would hold a secret
                "content_s3_endpoint: credentials belong in AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, not the URL"
            )


SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
WEBHOOK_EVENTS = frozenset({"video.completed", "video.failed"})


def _check_webhook_url(name: str, value: Any) -> None:
    url = urlsplit(value) if isinstance(value, str) else None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(f"{name}: must be an http(s) URL")


def _check_webhook_secret(name: str, value: Any) -> None:
    """Never echoed: the message names the problem only."""
    try:
        if not isinstance(value, str) or not value.startswith("whsec_"):
            raise ValueError
        base64.b64decode(value[6:], validate=True)
    except ValueError:
        raise SettingsError(f"{name}: must be whsec_ followed by base64") from None


def validate_webhooks(s: Settings) -> None:
    """Endpoints: a URL and whsec_ secrets each; a known event filter if any."""
    if s.webhook_url:
        _check_webhook_url("webhook_url", s.webhook_url)
        if not s.webhook_secret:
            raise SettingsError("webhook_secret: required with webhook_url")
    if s.webhook_secret:
        _check_webhook_secret("webhook_secret", s.webhook_secret)
    for name, spec in s.webhook_endpoints.items():
        where = f"webhook_endpoints.{name}"
        if not PROVIDER_RE.fullmatch(name) or (name == "default" and s.webhook_url):
            raise SettingsError(f"{where}: a lower-case name, not 'default' with webhook_url")
        unknown = set(spec) - {"url", "secret", "secrets", "events", "tenants"}
        if unknown:
            raise SettingsError(f"{where}: unknown keys {sorted(unknown)}")
        tenants = spec.get("tenants", [])
        if not isinstance(tenants, list) or not all(
            isinstance(t, str) and SHA256_HEX_RE.fullmatch(t) for t in tenants
        ):
            raise SettingsError(f"{where}.tenants: SHA-256 hex digests of credential values")
        _check_webhook_url(f"{where}.url", spec.get("url"))
        secrets = spec.get("secrets", [spec["secret"]] if "secret" in spec else [])
        if not isinstance(secrets, list) or not secrets:
            raise SettingsError(f"{where}.secrets: one or more whsec_ secrets")
        for secret in secrets:
            _check_webhook_secret(f"{where}.secrets", secret)
        events = spec.get("events", list(WEBHOOK_EVENTS))
        if not isinstance(events, list) or not set(events) <= WEBHOOK_EVENTS:
            raise SettingsError(f"{where}.events: a list of {sorted(WEBHOOK_EVENTS)}")
    if s.webhook_all_jobs and not (s.webhook_url or "default" in s.webhook_endpoints):
        raise SettingsError("webhook_all_jobs: needs the endpoint 'default' (webhook_url)")
    try:
        delays = retry_schedule(s.webhook_retry_schedule)
    except ValueError:
        raise SettingsError("webhook_retry_schedule: comma-separated seconds (>= 0)") from None
    if any(d < 0 for d in delays):
        raise SettingsError("webhook_retry_schedule: comma-separated seconds (>= 0)")


def retry_schedule(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]

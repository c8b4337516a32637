"""Bifrost's error envelope, so clients need one error parser for both services."""

from __future__ import annotations

import orjson

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    429: "rate_limit_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, *, param: str | None = None) -> bytes:
    """The JSON bytes of an error produced by the proxy itself."""
    error: dict[str, str] = {
        "type": ERROR_TYPES.get(status, "api_error"),
        "message": message,
    }
    if param is not None:
        error["param"] = param
    return orjson.dumps(
        {
            "is_bifrost_error": False,
            "status_code": status,
            "error": error,
            "extra_fields": {"proxy": "bifrost-video-proxy"},
        }
    )


class ProxyError(Exception):
    """Raised anywhere in request handling; becomes an envelope answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.status, self.message, param=self.param)


class NotSent(ProxyError):
    """Refused before anything was sent upstream (no connection could be made, or a
    budget limit): a create certainly did not happen, unlike after a timeout."""


class UnknownJob(ProxyError):
    """A 404 shaped exactly like Bifrost's answer for a job that does not exist: a job
    owned by another tenant must be indistinguishable from no job at all."""

    def __init__(self, upstream_segment: str) -> None:
        super().__init__(404, f"video {upstream_segment} not found")

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "is_bifrost_error": False,
                "status_code": 404,
                "error": {"type": "not_found_error", "message": self.message},
                "extra_fields": {},
            }
        )

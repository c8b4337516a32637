"""The ``id:provider`` video id grammar: parsing, validation, canonical form.

Pure functions only. Bifrost returns ids as ``<PathEscape(native)>:<provider>`` and
parses a path segment by percent-decoding it once and splitting on the first ``:``.
The proxy accepts every encoding a client plausibly sends (single- or double-encoded,
mixed-case provider, ``%3A`` for the colon) and maps them all to one canonical id,
which is what cache keys and upstream URLs are built from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

# Providers Bifrost knows today (its provider enum, video-capable or not): these keep
# their names in metric labels; any other well-formed name is accepted (deployments add
# custom providers) and counted as "other".
KNOWN_PROVIDERS: frozenset[str] = frozenset(
    {
        "openai", "azure", "gemini", "vertex", "runway", "runware", "replicate",
        "anthropic", "bedrock", "cohere", "deepseek", "fireworks", "mistral", "ollama",
        "groq", "sgl", "parasail", "perplexity", "cerebras", "openrouter", "elevenlabs",
        "huggingface", "nebius", "xai", "vllm",
    }
)  # fmt: skip

PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# C0 controls, DEL and C1 controls: never legitimate in an id, dangerous in headers/logs.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Go's url.PathEscape leaves these unescaped besides unreserved characters.
_GO_PATH_SAFE = "$&+:=@"
_MAX_DECODE_ROUNDS = 8


class InvalidVideoId(ValueError):
    """The id cannot be accepted; ``str(exc)`` is a client-safe message."""


@dataclass(frozen=True, slots=True)
class IdRules:
    """The configurable part of the grammar (from settings)."""

    max_length: int = 512
    allowed_providers: frozenset[str] | None = None  # None: any well-formed name
    provider_aliases: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class VideoId:
    native: str  # fully decoded provider-native id, e.g. "models/veo/operations/abc"
    provider: str  # lower-cased, aliases applied
    # ``PathEscape(native):provider``, exactly as Bifrost spells its own ids; a ":"
    # inside the native part (no provider's ids have one) is escaped too, so that the
    # first ":" always ends it and the id parses back to itself.
    canonical: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        native = go_path_escape(self.native).replace(":", "%3A")
        object.__setattr__(self, "canonical", f"{native}:{self.provider}")

    @property
    def upstream_segment(self) -> str:
        """The canonical id encoded as exactly one path segment.

        Bifrost decodes the segment once and the native half once more, so encoding
        the canonical id once more (``%`` → ``%25``, ``/`` → ``%2F``) round-trips, and
        no decoding step can ever turn it into a separator or a dot-segment.
        """
        return quote(self.canonical, safe=_GO_PATH_SAFE)


def go_path_escape(value: str) -> str:
    """Go's ``url.PathEscape``: keeps unreserved characters and ``$&+:=@``."""
    return quote(value, safe=_GO_PATH_SAFE)


def _strict_unquote(value: str) -> str:
    if _BAD_ESCAPE_RE.search(value):
        raise InvalidVideoId("invalid video_id encoding")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise InvalidVideoId("invalid video_id encoding") from None


def _fully_decode(value: str) -> str:
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in value:
            return value
        decoded = _strict_unquote(value)
        if decoded == value:
            return value
        value = decoded
    raise InvalidVideoId("invalid video_id encoding: too many levels of percent-encoding")


def normalize_provider(raw: str, rules: IdRules) -> str:
    """Lower-case, alias and check a provider name; raise InvalidVideoId if bad."""
    provider = raw.lower()
    if rules.provider_aliases:
        provider = rules.provider_aliases.get(provider, provider)
    if not PROVIDER_RE.fullmatch(provider):
        raise InvalidVideoId("invalid provider in video_id: must match [a-z0-9][a-z0-9_.-]*")
    if rules.allowed_providers is not None and provider not in rules.allowed_providers:
        raise InvalidVideoId(f"provider {provider!r} is not allowed by this proxy")
    return provider


def parse_segment(raw_segment: str, rules: IdRules) -> VideoId:
    """Parse the raw (still percent-encoded) path segment of a video route."""
    if len(raw_segment) > rules.max_length:
        raise InvalidVideoId(f"video_id is longer than {rules.max_length} characters")
    return parse_decoded(_strict_unquote(raw_segment), rules)


def parse_decoded(value: str, rules: IdRules) -> VideoId:
    """Parse an id that has been percent-decoded once (query values, JSON fields)."""
    if len(value) > rules.max_length:
        raise InvalidVideoId(f"video_id is longer than {rules.max_length} characters")
    if _CONTROL_RE.search(value):
        raise InvalidVideoId("video_id must not contain control characters")
    native, sep, provider = value.partition(":")
    if not sep or not native or not provider:
        raise InvalidVideoId("video_id must be in id:provider format")
    native = _fully_decode(native)
    if _CONTROL_RE.search(native):
        raise InvalidVideoId("video_id must not contain control characters")
    if not native.strip("."):
        # "." / ".." natives could only ever mean path traversal.
        raise InvalidVideoId("video_id native part must not be a dot-segment")
    return VideoId(native=native, provider=normalize_provider(provider, rules))


def canonical_answer_id(value: str, provider: str | None, rules: IdRules) -> str:
    """The canonical form of an id found in an upstream answer.

    Combined ids are canonicalised; a bare native id (no ``:provider``) gets the
    provider known from the request appended. Anything unparsable is left alone:
    the answer is the upstream's, the proxy only repairs what it understands.
    """
    native, sep, suffix = value.partition(":")
    if sep and native and PROVIDER_RE.fullmatch(suffix.lower()):
        try:
            lenient = IdRules(rules.max_length * 4, None, rules.provider_aliases)
            return parse_decoded(value, lenient).canonical
        except InvalidVideoId:
            return value
    if provider is None or not value:
        return value
    try:
        return VideoId(native=_fully_decode(value), provider=provider).canonical
    except InvalidVideoId:
        return value

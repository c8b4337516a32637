"""Table tests for the id grammar (pure, no I/O)."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from proxy.ids import (
    IdRules,
    InvalidVideoId,
    canonical_answer_id,
    go_path_escape,
    parse_decoded,
    parse_segment,
)

RULES = IdRules()
GEMINI = "models%2Fveo-3.0-generate-001%2Foperations%2Fabc:gemini"


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("video_x:openai", "video_x:openai"),
        ("video_x%3Aopenai", "video_x:openai"),
        ("video_x:OpenAI", "video_x:openai"),
        ("video_x%3AOPENAI", "video_x:openai"),
        ("task_1f0c:runway", "task_1f0c:runway"),
        (GEMINI, GEMINI),  # single-encoded
        (GEMINI.replace("%2F", "%252F"), GEMINI),  # double-encoded (the OpenAI SDK)
        (GEMINI.replace("%2F", "%25252F"), GEMINI),  # triple: still the same job
        ("a%20b:openai", "a%20b:openai"),
        ("caf%C3%A9:openai", "caf%C3%A9:openai"),
        ("a$&+=@b:openai", "a$&+=@b:openai"),  # PathEscape leaves these alone
        ("a%3Bb%2Cc%3Fd:openai", "a%3Bb%2Cc%3Fd:openai"),  # ; , ? are escaped
    ],
)
def test_canonical_forms(raw: str, canonical: str) -> None:
    assert parse_segment(raw, RULES).canonical == canonical


@pytest.mark.parametrize(
    "raw, message",
    [
        ("nocolon", "id:provider format"),
        (":openai", "id:provider format"),
        ("video_x:", "id:provider format"),
        ("%3Aopenai", "id:provider format"),
        ("video%zz:openai", "invalid video_id encoding"),
        ("video%4:openai", "invalid video_id encoding"),
        ("video%ff:openai", "invalid video_id encoding"),  # not UTF-8
        ("vid%0Aeo:openai", "control characters"),
        ("vid%00eo:openai", "control characters"),
        ("vid%250Deo:openai", "control characters"),  # CR hidden under double encoding
        ("video:open%0Dai", "control characters"),
        ("video:open ai", "must match"),
        ("video:-openai", "must match"),
        ("video:open/ai", "must match"),
        ("x" * 513 + ":openai", "longer than 512"),
        ("..:openai", "dot-segment"),
        ("%2E%2E:openai", "dot-segment"),
    ],
)
def test_rejections(raw: str, message: str) -> None:
    with pytest.raises(InvalidVideoId, match=message):
        parse_segment(raw, RULES)


def test_any_provider_by_default_and_a_list_restricts() -> None:
    assert parse_segment("task-1:runware", IdRules()).provider == "runware"
    assert parse_segment("x:my-custom.provider", IdRules()).provider == "my-custom.provider"
    with pytest.raises(InvalidVideoId, match="not allowed"):
        parse_segment("video:acme", IdRules(allowed_providers=frozenset({"openai"})))


def test_allowed_providers_star_and_aliases() -> None:
    any_provider = IdRules(allowed_providers=None, provider_aliases={"google": "gemini"})
    assert parse_segment("v:acme", any_provider).provider == "acme"
    assert parse_segment("v:Google", any_provider).canonical == "v:gemini"
    assert parse_segment("v:x", IdRules(allowed_providers=frozenset({"x"}))).provider == "x"


def test_max_length_is_configurable() -> None:
    with pytest.raises(InvalidVideoId):
        parse_segment("abcdef:openai", IdRules(max_length=10))


@pytest.mark.parametrize(
    "raw",
    [
        GEMINI,
        "video_x:openai",
        "..%2F..%2Fapi:openai",
        "..%252F..%252Fapi%252Fconfig:openai",
        "%2e%2e%2fcontent:openai",
        "abc%2Fcontent:openai",
        "a%2F.%2Fb:gemini",
    ],
)
def test_upstream_segment_is_one_segment_that_bifrost_decodes_back(raw: str) -> None:
    video = parse_segment(raw, RULES)
    segment = video.upstream_segment
    assert "/" not in segment and segment not in (".", "..")
    # Bifrost: decode the segment once, split on the first ':', decode the native once more.
    native, _, provider = unquote(segment).partition(":")
    assert unquote(native) == video.native
    assert provider == video.provider


@pytest.mark.parametrize(
    "native", ["models/veo/operations/abc", "video_1", "a b", "x;y,z?", "ü/ß", "%41", "%2541"]
)
def test_canonical_is_idempotent(native: str) -> None:
    once = parse_segment(f"{go_path_escape(native)}:openai", RULES).canonical
    assert parse_segment(once, RULES).canonical == once
    assert parse_decoded(once, RULES).canonical == once


@pytest.mark.parametrize(
    "value, provider, expected",
    [
        ("video_1:openai", "openai", "video_1:openai"),
        ("video_1", "openai", "video_1:openai"),  # bare native id: provider appended
        ("models/veo/operations/a", "gemini", "models%2Fveo%2Foperations%2Fa:gemini"),
        ("video_1:OpenAI", None, "video_1:openai"),
        ("video_1", None, "video_1"),  # nothing known: left alone
        ("task_9:runway", "openai", "task_9:runway"),  # already combined: kept
    ],
)
def test_answer_ids(value: str, provider: str | None, expected: str) -> None:
    assert canonical_answer_id(value, provider, RULES) == expected


def test_a_colon_inside_the_native_part_round_trips() -> None:
    # Found by the property test: "0%253A:0" decodes to the native "0:"; the id the
    # proxy sends upstream must parse back to the same id (it did not: "0::0").
    video = parse_segment("0%253A:0", IdRules())
    assert video.native == "0:" and video.provider == "0"
    again = parse_segment(video.upstream_segment, IdRules())
    assert again == video and again.upstream_segment == video.upstream_segment

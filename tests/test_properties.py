"""Property tests (hypothesis): id canonicalisation and arbitrary requests.

Requests go in-process (httpx ASGITransport) to the proxy app whose upstream is an
httpx MockTransport that records every call, so thousands of random inputs run
in seconds; the socket-level behaviour is covered by the end-to-end suites.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, unquote

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.ids import IdRules, InvalidVideoId, go_path_escape, parse_segment
from tests.conftest import make_settings

RULES = IdRules()
PROVIDERS = st.sampled_from(["openai", "gemini", "runway", "OpenAI", "GEMINI", "azure"])
NATIVE = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=40)


@given(native=NATIVE, provider=PROVIDERS)
def test_encodings_of_one_id_map_to_one_canonical_id(native: str, provider: str) -> None:
    try:
        once = parse_segment(f"{go_path_escape(native)}:{provider}", RULES)
    except InvalidVideoId:
        return  # e.g. a dot-segment native: rejected in every form
    canonical = once.canonical
    forms = [
        quote(canonical, safe="$&+:=@"),  # double-encoded, as the OpenAI SDK sends it
        canonical.replace(":", "%3A", 1),
        canonical.rpartition(":")[0] + ":" + provider.upper(),
    ]
    for form in forms:
        assert parse_segment(form, RULES).canonical == canonical, form
    assert parse_segment(canonical, RULES).canonical == canonical  # idempotent


@given(raw=st.text(max_size=80))
def test_canonical_of_canonical_is_canonical(raw: str) -> None:
    try:
        canonical = parse_segment(quote(raw, safe=":%"), RULES).canonical
    except InvalidVideoId:
        return
    assert parse_segment(canonical, RULES).canonical == canonical
    segment = parse_segment(canonical, RULES).upstream_segment
    assert "/" not in segment and unquote(segment) == canonical


class Recorder:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.raw_path.decode().split("?")[0])
        # A streamed body, as a real transport gives: httpx reads a plain ``content``
        # answer at once, and the proxy's streaming read would then find it consumed.
        return httpx.Response(
            200, headers={"content-type": "application/json"}, stream=_Streamed(ANSWER)
        )


ANSWER = b'{"id": "video_1:openai", "object": "video", "status": "queued"}'


class _Streamed(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> Any:
        yield self.data


SEGMENT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="/?#"), max_size=20
)
PATHS = st.one_of(
    st.lists(SEGMENT, max_size=6).map(lambda s: "/" + "/".join(s)),
    st.tuples(
        st.sampled_from(["/v1/videos/", "/openai/v1/videos/"]),
        SEGMENT,
        st.sampled_from(["", "/content", "/remix", "/x", "/../api"]),
    ).map("".join),
    # Unknown sub-paths under …/videos: ids (a ":" somewhere, however encoded) and
    # literals, with any depth.
    st.tuples(
        st.sampled_from(["/v1/videos/", "/openai/v1/videos/"]),
        st.one_of(
            SEGMENT,
            st.tuples(SEGMENT, st.sampled_from([":", "%3A", "%253A"]), SEGMENT).map("".join),
        ),
        st.lists(SEGMENT, max_size=3).map(lambda s: "".join("/" + x for x in s)),
    ).map("".join),
)
METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"])
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=METHODS,
    path=PATHS,
    query=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="#"), max_size=30
    ),
    auth=HEADER_VALUES,
    body=st.binary(max_size=64),
)
def test_random_requests_never_5xx_and_never_leave_the_video_routes(
    method: str, path: str, query: str, auth: str, body: bytes
) -> None:
    recorder = Recorder()
    app = create_app(
        make_settings("http://bifrost.test", upstream_client="httpx"),
        transport=httpx.MockTransport(recorder),
    )

    async def go() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://proxy.test"
            ) as client:
                request = client.build_request(
                    method, "http://proxy.test/", content=body, headers={"authorization": auth}
                )
                request.url = request.url.copy_with(
                    raw_path=(path + ("?" + query if query else "")).encode()
                )
                return await client.send(request)

    response = asyncio.run(go())
    proxied = bool(recorder.paths)
    if not proxied:
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        envelope: dict[str, Any] = orjson.loads(response.content)
        assert envelope["status_code"] == response.status_code and envelope["error"]["message"]
    else:
        assert response.status_code < 500, (path, response.text)
    for sent in recorder.paths:
        assert not sent.startswith("/api"), sent
        segments = sent.split("/")
        assert ".." not in [unquote(unquote(s)) for s in segments]
        if sent.startswith(("/v1/videos/", "/openai/v1/videos/")):
            video_target_shape(sent, method)
    if proxied and path.split("?")[0].startswith(("/v1/videos", "/openai/v1/videos")):
        assert len(recorder.paths) == 1  # forwarded once


def video_target_shape(target: str, method: str = "GET") -> bool:
    """Check a target the proxy sent under ``…/videos``: a segment after ``videos`` that
    holds a ``:`` (however encoded) is a valid id in its canonical form, never an
    unvalidated one; any other is a literal route name. True for the operations the
    proxy improves (retrieve, delete, content, remix), whose shape is fixed."""
    from proxy.routes import fully_decode

    tail = target.split("?")[0].split("/videos", 1)[1].split("/")[1:]
    assert all(tail), target
    if not tail or ":" not in fully_decode(tail[0]):
        return False  # a literal route (edits, characters, …): Bifrost's to answer
    video = parse_segment(tail[0], IdRules())
    assert tail[0] == video.upstream_segment, target
    known = {("GET", ()), ("DELETE", ()), ("GET", ("content",)), ("POST", ("remix",))}
    return (method, tuple(tail[1:])) in known


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["create", "retrieve", "poll_other", "list", "delete", "advance"]),
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS)
def test_no_answer_ever_contains_another_tenants_job(actions: list[tuple[str, str, int]]) -> None:
    from proxy.simulator.app import SimulatorConfig, create_simulator
    from tests.conftest import FakeClock

    clock = FakeClock()
    sim = create_simulator(SimulatorConfig(queued_seconds=1, in_progress_seconds=1, clock=clock))
    app = create_app(
        make_settings("http://bifrost.test", upstream_client="httpx"),
        transport=httpx.ASGITransport(app=sim),
        clock=clock,
    )
    owned: dict[str, set[str]] = {"a": set(), "b": set(), "c": set()}
    seen_ids: list[str] = []

    def ids_in(doc: Any) -> set[str]:
        if not isinstance(doc, dict):
            return set()
        found = (
            {doc["id"]}
            if isinstance(doc.get("id"), str) and doc.get("object") == "video"
            else set()
        )
        for item in doc.get("data") or []:
            found |= ids_in(item)
        return found

    async def go() -> None:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://proxy.test"
            ) as client,
        ):
            for tenant, action, n in actions:
                headers = {"authorization": f"Bearer sk-bf-{tenant}"}
                if action == "create":
                    r = await client.post(
                        "/v1/videos",
                        json={"model": "openai/sora-2", "prompt": "x"},
                        headers=headers,
                    )
                    owned[tenant].add(r.json()["id"])
                    seen_ids.append(r.json()["id"])
                    continue
                if action == "advance":
                    clock.advance(1.5)
                    continue
                if action == "list":
                    r = await client.get("/v1/videos?provider=openai", headers=headers)
                elif not seen_ids:
                    continue
                else:
                    vid = seen_ids[n % len(seen_ids)]
                    method = "DELETE" if action == "delete" else "GET"
                    r = await client.request(method, f"/v1/videos/{vid}", headers=headers)
                    if action == "delete" and r.status_code == 200:
                        owned[tenant].discard(vid)
                        continue
                assert r.status_code < 500
                leaked = ids_in(r.json()) - owned[tenant]
                assert not leaked, (tenant, action, leaked)

    asyncio.run(go())

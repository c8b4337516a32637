"""Issue 21: Bifrost as it is today. Edits, routes the proxy does not know, today's
providers and their id shapes, any variant, the long-poll contract, contract drift, and
one log format. Over real sockets (the simulator behind an in-thread proxy or the
console script), through the OpenAI SDK where it applies."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import httpx
import pytest

from proxy.ids import IdRules, parse_segment
from proxy.simulator.app import expected_content
from tests.conftest import ProxyURL, Upstream
from tests.servers import run_proxy, wait_until
from tests.test_metrics import scrape, value
from tests.test_openai_sdk import sdk
from tests.test_proxy_core import ALICE, BOB, assert_envelope

FAMILIES = ["/v1", "/openai/v1"]
LIVE_MODEL = "gemini/veo-3.1-fast-generate-001"


def new_job(base: str, model: str, prefix: str = "/v1", prompt: str = "a cat", **h: str) -> str:
    r = httpx.post(
        f"{base}{prefix}/videos", json={"model": model, "prompt": prompt}, headers={**ALICE, **h}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


# -- 7. today's providers, each with its real id shape, end to end -------------------------
PROVIDERS = [
    (LIVE_MODEL, r"models%2Fveo-3\.1-fast-generate-001%2Foperations%2F[0-9a-f]{16}:gemini"),
    ("vertex/veo-3.0-generate-001",
     r"projects%2Fsim-project%2Flocations%2Fus-central1%2Fpublishers%2Fgoogle%2Fmodels"
     r"%2Fveo-3\.0-generate-001%2Foperations%2F[0-9]+:vertex"),
    ("runway/gen4_turbo", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}:runway"),
    ("runware/vidu-q1", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}:runware"),
    ("replicate/minimax-video-01", r"[a-z0-9]{26}:replicate"),
    ("openai/sora-2", r"video_[0-9a-f]{24}:openai"),
]  # fmt: skip


@pytest.mark.parametrize("prefix", FAMILIES)
@pytest.mark.parametrize("model, shape", PROVIDERS)
def test_each_provider_end_to_end(
    proxy: ProxyURL, upstream: Upstream, model: str, shape: str, prefix: str
) -> None:
    vid = new_job(proxy, model, prefix)
    assert re.fullmatch(shape, vid), vid
    url = f"{proxy}{prefix}/videos/{vid}"
    assert httpx.get(url, headers=ALICE).json()["status"] == "queued"
    upstream.clock.advance(31)
    first = httpx.get(url, headers=ALICE)
    assert first.json()["status"] == "completed" and first.headers["x-cache-status"] == "MISS"
    again = httpx.get(url, headers=ALICE)
    assert again.headers["x-cache-status"] == "HIT" and again.json()["id"] == vid
    assert ("expires_at" in again.json()) == model.startswith("openai/")
    content = httpx.get(url + "/content", headers=ALICE)
    native = httpx.get(upstream.url + f"/v1/videos/{vid}", headers=ALICE).json()["id"]
    from urllib.parse import unquote

    assert content.status_code == 200
    assert content.content == expected_content(
        unquote(native.rpartition(":")[0]), "video", len(content.content)
    )


def test_unsupported_operations_are_bifrosts_own_errors(proxy: ProxyURL) -> None:
    vid = new_job(proxy, "runway/gen4_turbo")
    remix = httpx.post(f"{proxy}/v1/videos/{vid}/remix", json={"prompt": "b"}, headers=ALICE)
    assert remix.status_code == 400 and remix.json()["is_bifrost_error"] is True
    assert "not supported by runway" in remix.json()["error"]["message"]
    listed = httpx.get(f"{proxy}/v1/videos?provider=runway", headers=ALICE)
    assert listed.status_code == 400 and listed.json()["error"]["type"] == "unsupported_operation"


def test_new_fields_pass_through_unchanged(proxy: ProxyURL, upstream: Upstream) -> None:
    filtered = new_job(proxy, LIVE_MODEL, prompt="something unsafe")
    runware = new_job(proxy, "runware/vidu-q1")
    upstream.clock.advance(31)
    for vid in (filtered, runware):
        mine = httpx.get(f"{proxy}/v1/videos/{vid}", headers=ALICE).json()
        direct = httpx.get(f"{upstream.url}/v1/videos/{vid}", headers=ALICE).json()
        for doc in (mine, direct):
            doc["extra_fields"].pop("latency")
        assert mine == direct
    bad = httpx.get(f"{proxy}/v1/videos/{filtered}", headers=ALICE).json()
    assert bad["status"] == "failed" and bad["error"]["code"] == "content_filtered"
    assert bad["content_filter"] == {"filtered_count": 1, "reasons": ["simulated RAI"]}
    good = httpx.get(f"{proxy}/v1/videos/{runware}", headers=ALICE).json()
    assert good["usage"] == {"cost": 0.05} and good["videos"][0]["id"]


# -- 1. edits -----------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", FAMILIES)
def test_a_json_edit_reaches_bifrost_unchanged_and_answers_a_new_owned_job(
    proxy: ProxyURL, upstream: Upstream, prefix: str
) -> None:
    source = new_job(proxy, "runware/vidu-q1", prefix)
    body = json.dumps({"prompt": "make it blue", "video": {"id": source}}).encode()
    r = httpx.post(
        f"{proxy}{prefix}/videos/edits",
        content=body,
        headers={**ALICE, "content-type": "application/json", "Idempotency-Key": "edit-1"},
    )
    assert r.status_code == 200, r.text
    edited = r.json()["id"]
    assert edited.endswith(":runware") and edited != source
    seen = upstream.sim.state.requests[-1]
    assert (seen.raw_path, seen.body) == (f"{prefix}/videos/edits", body)
    assert seen.header("content-length") == str(len(body))
    # Owned by its creator; the key replays it; the source's owner was checked.
    assert httpx.get(f"{proxy}{prefix}/videos/{edited}", headers=BOB).status_code == 404
    again = httpx.post(
        f"{proxy}{prefix}/videos/edits",
        content=body,
        headers={**ALICE, "content-type": "application/json", "Idempotency-Key": "edit-1"},
    )
    assert again.json()["id"] == edited and again.headers["idempotent-replayed"] == "true"
    assert sum(1 for q in upstream.sim.state.requests if q.raw_path.endswith("/edits")) == 1


@pytest.mark.parametrize("prefix", FAMILIES)
def test_the_openai_sdk_edit_works_through_the_proxy(
    proxy: ProxyURL, upstream: Upstream, prefix: str
) -> None:
    clip = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64  # a video file to edit
    edited = sdk(proxy, prefix).videos.edit(
        prompt="sunset", video=("in.mp4", clip, "video/mp4"), extra_query={"provider": "openai"}
    )
    assert edited.id.endswith(":openai") and edited.status == "queued"
    seen = upstream.sim.state.requests[-1]
    assert seen.raw_path == f"{prefix}/videos/edits" and seen.query == "provider=openai"
    assert seen.header("content-type").startswith("multipart/form-data")
    assert clip in seen.body and seen.header("content-length") == str(len(seen.body))
    mine = sdk(proxy, prefix).videos.retrieve(edited.id)
    assert mine.id == edited.id
    assert httpx.get(f"{proxy}{prefix}/videos/{edited.id}", headers=BOB).status_code == 404


def test_a_multipart_edit_naming_a_video_id_is_checked(proxy: ProxyURL, upstream: Upstream) -> None:
    source = new_job(proxy, "openai/sora-2", "/openai/v1")
    fields = {"prompt": "sunset", "video[id]": source}
    ok = httpx.post(
        f"{proxy}/openai/v1/videos/edits", files={"x": (None, "")}, data=fields, headers=ALICE
    )
    assert ok.status_code == 200 and ok.json()["id"].endswith(":openai")
    assert f'name="video[id]"\r\n\r\n{source}'.encode() in upstream.sim.state.requests[-1].body
    calls = upstream.calls
    bad = httpx.post(
        f"{proxy}/openai/v1/videos/edits", data={"prompt": "p", "video[id]": "nocolon"},
        files={"x": (None, "")}, headers=ALICE,
    )  # fmt: skip
    assert_envelope(bad, 400, "video.id")
    assert upstream.calls == calls


def test_edit_ids_are_validated_and_ownership_checked(proxy: ProxyURL, upstream: Upstream) -> None:
    upstream.sim.state.config.shared_account = True
    source = new_job(proxy, "runware/vidu-q1")
    calls = upstream.calls
    for bad in ("nocolon", ":runware", "a%zz:runware"):
        r = httpx.post(
            f"{proxy}/v1/videos/edits", json={"prompt": "p", "video": {"id": bad}}, headers=ALICE
        )
        assert_envelope(r, 400, "video.id")
    assert upstream.calls == calls
    unknown = source.replace(source[:8], "00000000", 1)
    mine = httpx.post(
        f"{proxy}/v1/videos/edits", json={"prompt": "p", "video": {"id": unknown}}, headers=BOB
    )
    foreign = httpx.post(
        f"{proxy}/v1/videos/edits", json={"prompt": "p", "video": {"id": source}}, headers=BOB
    )
    assert foreign.status_code == mine.status_code == 404
    assert foreign.text == mine.text.replace(unknown, source)
    assert not any(
        source.split(":")[0] in q.body.decode(errors="replace")
        for q in upstream.sim.state.requests[calls:]
    )  # the real job was never addressed
    assert_envelope(
        httpx.post(
            f"{proxy}/v1/videos/edits",
            json={"prompt": "p", "video": {"id": source}},
            headers={**ALICE, "X-Proxy-Webhook": "nope"},
        ),
        400,
        "X-Proxy-Webhook",
    )


# -- 2. routes the proxy does not know are forwarded ---------------------------------------
def test_unknown_video_routes_are_forwarded(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = new_job(proxy, LIVE_MODEL)
    for method, path in [
        ("POST", "/v1/videos/extensions"),
        ("GET", "/v1/videos/characters/char_123"),
        ("PUT", "/v1/videos"),
        ("GET", "/openai/v1/videos/characters/char_123"),
    ]:
        r = httpx.request(method, proxy + path, headers=ALICE, json={"x": 1})
        assert r.status_code == 404 and "no route" in r.json()["error"]["message"], path
        assert upstream.sim.state.requests[-1].raw_path == path
    r = httpx.get(f"{proxy}/v1/videos/{vid}/frames", headers=ALICE)
    segment = parse_segment(vid, IdRules()).upstream_segment  # as on every video route
    assert r.status_code == 404
    assert upstream.sim.state.requests[-1].raw_path == f"/v1/videos/{segment}/frames"
    calls = upstream.calls
    assert_envelope(httpx.get(f"{proxy}/v1/videos/x:/frames"), 400, "id:provider")
    assert httpx.get(f"{proxy}/v1/videos/{vid}/frames", headers=BOB).status_code == 404
    assert_envelope(httpx.get(f"{proxy}/v1/videos//frames"), 404, "no such video route")
    assert upstream.calls == calls


# -- 4. variants ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sprite_sheet", "spritesheet", "thumbnail"])
def test_any_well_formed_variant_is_forwarded(
    proxy: ProxyURL, upstream: Upstream, variant: str
) -> None:
    vid = new_job(proxy, LIVE_MODEL)
    upstream.clock.advance(31)
    r = httpx.get(f"{proxy}/v1/videos/{vid}/content?variant={variant}", headers=ALICE)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
    assert upstream.sim.state.requests[-1].query == f"variant={variant}"


# -- 5. the long-poll contract -------------------------------------------------------------
def test_a_long_poll_is_not_ended_by_a_status_change(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05)
    vid = new_job(base, LIVE_MODEL)
    out: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: out.append(
            httpx.get(f"{base}/v1/videos/{vid}", headers={**ALICE, "Prefer": "wait=30"}, timeout=60)
        )
    )
    waiter.start()
    wait_until(lambda: base.app.watchers.waiters == 1, what="the long-poll waits")
    upstream.clock.advance(15)  # queued -> in_progress: a change, not the end
    (watch,) = base.app.watchers._watches.values()
    wait_until(lambda: watch.state is not None and watch.state[0] == "in_progress")
    # The change was seen; the long-poll must go on waiting (a bounded check that
    # returns at once if it answered).
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: bool(out) or base.app.watchers.waiters == 0, timeout=1.0)
    upstream.clock.advance(16)
    waiter.join(30)
    assert out[0].json()["status"] == "completed"
    assert out[0].headers["preference-applied"] == "wait=30"


# -- 6. contract drift ---------------------------------------------------------------------
DRIFTS = [
    ("status", {"status": "processing"}),
    ("seconds", {"status": "completed", "seconds": 8}),
    ("expires_at", {"status": "completed", "expires_at": "2026-12-01T00:00:00Z"}),
]


@pytest.mark.parametrize("field, change", DRIFTS)
def test_contract_drift_is_relayed_uncached_and_counted(
    proxy_process: Any, upstream: Upstream, field: str, change: dict[str, Any]
) -> None:
    base = proxy_process.url
    vid = new_job(base, LIVE_MODEL)
    native = vid.rpartition(":")[0]
    answer = {"id": native, "object": "video", "seconds": "8", **change}  # a bare id
    for _ in range(2):
        upstream.sim.state.faults.append(
            {"status": 200, "body": json.dumps(answer).encode(),
             "headers": {"content-type": "application/json"}}
        )  # fmt: skip
        r = httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE)
        assert r.status_code == 200 and r.headers["x-cache-status"] == "MISS"
        assert r.json() == {**answer, "id": vid}  # the documented id rewrite, nothing else
    m = scrape(base)
    name = "bifrost_proxy_upstream_contract_violations_total"
    assert value(m, name, route="/v1/videos/{video_id}", field=field) == 2
    logged = [line for line in proxy_process.log().splitlines() if "documented shape" in line]
    assert len(logged) == 1 and f"field={field}" in logged[0]


def test_a_create_answer_without_a_provider_suffix_is_counted(
    proxy_process: Any, upstream: Upstream
) -> None:
    upstream.sim.state.faults.append(
        {"status": 200, "body": b'{"id": "op-1", "object": "video", "status": "queued"}',
         "headers": {"content-type": "application/json"}}
    )  # fmt: skip
    r = httpx.post(
        f"{proxy_process.url}/v1/videos", json={"model": LIVE_MODEL, "prompt": "p"}, headers=ALICE
    )
    assert r.json()["id"] == "op-1:gemini"
    m = scrape(proxy_process.url)
    name = "bifrost_proxy_upstream_contract_violations_total"
    assert value(m, name, route="/v1/videos", field="id") == 1


# -- 9. one log format ---------------------------------------------------------------------
def test_every_startup_line_is_json_and_appears_once(tmp_path: Any) -> None:
    with run_proxy("http://127.0.0.1:9", "--simulate", tmp_path=tmp_path) as proc:
        wait_until(lambda: "Uvicorn running" in proc.log(), what="uvicorn's startup line")
        lines = proc.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    messages = [r["message"] for r in records]
    assert sum(m.startswith("Started server process") for m in messages) == 1
    assert any("listening on" in m for m in messages)
    assert any("simulator" in m for m in messages)


def test_new_fields_are_relayed_byte_for_byte(proxy: ProxyURL, upstream: Upstream) -> None:
    vid = new_job(proxy, "runware/vidu-q1")
    body = (
        b'{"id":"' + vid.encode() + b'","object":"video","status":"completed","seconds":"4",'
        b'"usage":{"cost":0.0500},"content_filter":{"filtered_count":0,"reasons":[]},'
        b'"videos":[{"id":"v-1","url":"https://x/y.mp4","content_type":"video/mp4"}],'
        b'"future_field":{"nested":[1,2.50,"\\u00e9"]}}'
    )
    upstream.sim.state.faults.append(
        {"status": 200, "body": body, "headers": {"content-type": "application/json"}}
    )
    r = httpx.get(f"{proxy}/v1/videos/{vid}", headers=ALICE)
    assert r.content == body  # nothing to rewrite: the upstream's bytes, unchanged


def test_an_edit_with_a_webhook_is_followed_and_delivered(
    make_proxy: Any, upstream: Upstream
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.servers import serve_in_thread
    from tests.test_webhooks import Receiver, proxy_with_webhooks, verified

    receiver = Receiver()

    async def hook(request: Request) -> Response:
        receiver.deliveries.append((dict(request.headers), await request.body(), 0.0))
        return Response(b"", 200)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with serve_in_thread(app, lifespan="off") as server:
        receiver.url = server.url + "/hook"
        base = proxy_with_webhooks(make_proxy, receiver)
        source = new_job(base, "runware/vidu-q1")
        r = httpx.post(
            f"{base}/v1/videos/edits",
            json={"prompt": "blue", "video": {"id": source}},
            headers={**ALICE, "X-Proxy-Webhook": "default"},
        )
        edited = r.json()["id"]
        upstream.clock.advance(31)
        wait_until(lambda: len(receiver.deliveries) == 1, what="the edit's event")
        event = verified(receiver.deliveries[0])
        assert event["data"]["id"] == edited and event["type"] == "video.completed"


def test_edits_across_replicas_on_redis(upstream: Upstream, tmp_path: Any) -> None:
    from tests.redis_server import redis_server
    from tests.servers import run_replicas
    from tests.test_redis_cache import redis_env

    upstream.sim.state.config.shared_account = True
    with redis_server() as redis, run_replicas(upstream.url, redis_env(redis), tmp_path) as (a, b):
        source = new_job(a.url, "runware/vidu-q1")
        edit = {"prompt": "p", "video": {"id": source}}
        foreign = httpx.post(f"{b.url}/v1/videos/edits", json=edit, headers=BOB)
        assert foreign.status_code == 404  # the owner recorded by a is known to b
        r = httpx.post(
            f"{b.url}/v1/videos/edits", json=edit, headers={**ALICE, "Idempotency-Key": "e-1"}
        )
        assert r.status_code == 200
        again = httpx.post(
            f"{a.url}/v1/videos/edits", json=edit, headers={**ALICE, "Idempotency-Key": "e-1"}
        )
        assert again.json()["id"] == r.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        assert httpx.get(f"{a.url}/v1/videos/{r.json()['id']}", headers=BOB).status_code == 404

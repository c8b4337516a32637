"""Webhooks for video jobs (part 1: the memory backend), over real sockets: a create with
X-Proxy-Webhook, the proxy follows the job, and a real receiver on loopback verifies
every delivery with the OpenAI SDK's verifier and with the standardwebhooks package."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from openai import OpenAI
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import Upstream
from tests.servers import run_proxy, run_replicas, serve_in_thread, wait_until
from tests.test_proxy_core import ALICE, assert_envelope

SECRET = "whsec_" + base64.b64encode(b"proxy-test-webhook-secret-32byte").decode()


@dataclass
class Receiver:
    url: str = ""
    answers: list[int] = field(default_factory=list)  # statuses to answer, in order; then 200
    hang: float = 0.0
    deliveries: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    async def hook(request: Request) -> Response:
        body = await request.body()
        state.deliveries.append((dict(request.headers), body, time.time()))
        if state.hang:
            import asyncio

            await asyncio.sleep(state.hang)
        status = state.answers.pop(0) if state.answers else 200
        return Response(b"", status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with serve_in_thread(app, lifespan="off") as server:
        state.url = server.url + "/hook"
        yield state


def proxy_with_webhooks(make_proxy: Any, receiver: Receiver, **extra: Any) -> Any:
    return make_proxy(
        webhook_url=receiver.url, webhook_secret=SECRET, webhook_poll_seconds=0.05, **extra
    )


def create_followed(base: str, model: str = "openai/sora-2", prompt: str = "a cat") -> str:
    r = httpx.post(
        f"{base}/v1/videos",
        json={"model": model, "prompt": prompt},
        headers={**ALICE, "X-Proxy-Webhook": "default"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def verified(delivery: tuple[dict[str, str], bytes, float]) -> dict[str, Any]:
    headers, body, _ = delivery
    OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=SECRET)
    payload: dict[str, Any] = Webhook(SECRET).verify(body, headers)
    return payload


@pytest.mark.parametrize(
    "model, prompt, kind",
    [
        ("openai/sora-2", "a cat", "video.completed"),
        ("openai/sora-2", "fail please", "video.failed"),
        ("gemini/veo-3", "a cat", "video.completed"),
    ],
)
def test_one_verifiable_event_when_the_job_ends(
    make_proxy: Any, upstream: Upstream, receiver: Receiver, model: str, prompt: str, kind: str
) -> None:
    base = proxy_with_webhooks(make_proxy, receiver)
    video = create_followed(base, model, prompt)
    assert upstream.sim.state.requests[-1].header("x-proxy-webhook") is None  # not forwarded
    wait_until(lambda: base.app.webhooks.follow_count() == 1, what="followed")
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 1, what="the delivery")
    event = verified(receiver.deliveries[0])
    assert event["type"] == kind and event["object"] == "event"
    assert event["id"].startswith("evt_") and event["id"] == receiver.deliveries[0][0]["webhook-id"]
    assert event["data"]["id"] == video and event["data"]["status"] == kind.split(".")[1]
    assert receiver.deliveries[0][0]["content-type"] == "application/json"
    wait_until(lambda: base.app.webhooks.follow_count() == 0, what="done following")
    assert len(receiver.deliveries) == 1


def test_retries_keep_the_event_id_and_410_stops(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    base = proxy_with_webhooks(make_proxy, receiver, webhook_retry_schedule="0.05,0.05,0.05")
    receiver.answers = [500, 503]
    create_followed(base)
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 3, what="two retries")
    ids = {headers["webhook-id"] for headers, _, _ in receiver.deliveries}
    assert len(ids) == 1 and all(verified(d) for d in receiver.deliveries)
    receiver.deliveries.clear()
    receiver.answers = [410]
    create_followed(base, prompt="another")
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 1, what="the 410")
    wait_until(lambda: base.app.webhooks.follow_count() == 0, what="stopped")
    assert len(receiver.deliveries) == 1  # 410: never retried


def test_a_receiver_that_hangs_is_timed_out_and_retried(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    base = proxy_with_webhooks(
        make_proxy, receiver, webhook_timeout_seconds=0.2, webhook_retry_schedule="0.05"
    )
    receiver.hang = 1.0
    create_followed(base)
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 2, what="a retry after the timeout")


def test_unknown_endpoint_is_400_and_creates_nothing(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    base = proxy_with_webhooks(make_proxy, receiver)
    for name in ("nope", ""):
        r = httpx.post(
            f"{base}/v1/videos",
            json={"model": "openai/sora-2", "prompt": "x"},
            headers={**ALICE, "X-Proxy-Webhook": name},
        )
        assert_envelope(r, 400, "X-Proxy-Webhook")
    no_webhooks = make_proxy()
    r = httpx.post(
        f"{no_webhooks}/v1/videos",
        json={"model": "openai/sora-2", "prompt": "x"},
        headers={**ALICE, "X-Proxy-Webhook": "default"},
    )
    assert_envelope(r, 400, "X-Proxy-Webhook")
    assert upstream.calls == 0


def test_secrets_never_appear_in_output(
    upstream: Upstream, receiver: Receiver, tmp_path: Any
) -> None:
    env = {
        "PROXY_WEBHOOK_URL": receiver.url, "PROXY_WEBHOOK_SECRET": SECRET,
        "PROXY_WEBHOOK_POLL_SECONDS": "0.05", "PROXY_LOG_LEVEL": "debug",
    }  # fmt: skip
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as proc:
        started = time.time()
        create_followed(proc.url)
        upstream.clock.advance(31)
        wait_until(lambda: len(receiver.deliveries) == 1, what="the delivery")
        verified(receiver.deliveries[0])
        latency = receiver.deliveries[0][2] - started
        metrics = httpx.get(proc.url + "/metrics").text
    assert (
        'bifrost_proxy_webhook_deliveries_total{endpoint="default",outcome="delivered"} 1.0'
        in metrics
    )
    secret_b64 = SECRET.removeprefix("whsec_")
    for text in (proc.log(), metrics):
        assert SECRET not in text and secret_b64 not in text
    assert latency < 10  # delivered within webhook_poll_seconds + a few of the test's steps
    bad = {"PROXY_WEBHOOK_URL": receiver.url, "PROXY_WEBHOOK_SECRET": "not-a-secret-xyz"}
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("bifrost-video-proxy")
    result = subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=30, env={**bad, "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 2 and "webhook_secret" in result.stderr
    assert "not-a-secret-xyz" not in result.stderr


def test_a_follower_thread_is_not_needed_for_plain_creates(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    base = proxy_with_webhooks(make_proxy, receiver)
    r = httpx.post(
        f"{base}/v1/videos", json={"model": "openai/sora-2", "prompt": "x"}, headers=ALICE
    )
    assert r.status_code == 200
    assert base.app.webhooks.follow_count() == 0


OLD = "whsec_" + base64.b64encode(b"the-old-secret-still-in-rotation").decode()


def test_named_endpoint_rotation_and_event_filter(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    endpoints = {
        "ops": {"url": receiver.url, "secrets": [SECRET, OLD], "events": ["video.failed"]},
    }
    base = make_proxy(webhook_endpoints=endpoints, webhook_poll_seconds=0.05)
    for prompt in ("a cat", "fail please"):  # completed (filtered out), then failed
        r = httpx.post(
            f"{base}/v1/videos",
            json={"model": "openai/sora-2", "prompt": prompt},
            headers={**ALICE, "X-Proxy-Webhook": "ops"},
        )
        assert r.status_code == 200
    upstream.clock.advance(31)
    wait_until(lambda: base.app.webhooks.follow_count() == 0, what="both jobs ended")
    assert len(receiver.deliveries) == 1
    headers, body, _ = receiver.deliveries[0]
    assert len(headers["webhook-signature"].split()) == 2  # both secrets sign
    for secret in (SECRET, OLD):  # a receiver with either secret verifies it
        OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=secret)
        assert Webhook(secret).verify(body, headers)["type"] == "video.failed"


def test_webhook_all_jobs_follows_every_create(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    base = proxy_with_webhooks(make_proxy, receiver, webhook_all_jobs=True)
    r = httpx.post(
        f"{base}/v1/videos", json={"model": "openai/sora-2", "prompt": "x"}, headers=ALICE
    )
    assert r.status_code == 200
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 1, what="a delivery without the header")
    assert verified(receiver.deliveries[0])["data"]["id"] == r.json()["id"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"webhook_url": "http://h/x"}, "webhook_secret: required"),
        ({"webhook_url": "ftp://h/x", "webhook_secret": SECRET}, "webhook_url"),
        ({"webhook_url": "http://h/x", "webhook_secret": "plain-secret-value"}, "webhook_secret"),
        ({"webhook_all_jobs": True}, "webhook_all_jobs"),
        ({"webhook_endpoints": {"ops": {"url": "http://h/x"}}}, "secrets"),
        (
            {
                "webhook_endpoints": {
                    "ops": {"url": "http://h/x", "secret": SECRET, "events": ["x"]}
                }
            },
            "events",
        ),
        ({"webhook_retry_schedule": "5,soon"}, "webhook_retry_schedule"),
    ],
)
def test_invalid_webhook_settings_are_named_without_their_secrets(
    overrides: dict[str, Any], fragment: str
) -> None:
    from proxy.settings import SettingsError, load

    with pytest.raises(SettingsError) as info:
        load(env={}, overrides=overrides)
    assert fragment in str(info.value)
    assert "plain-secret-value" not in str(info.value) and SECRET not in str(info.value)


def test_endpoints_from_the_environment_as_json() -> None:
    import json

    from proxy.settings import load

    env = {"PROXY_WEBHOOK_ENDPOINTS": json.dumps({"ops": {"url": "http://h/x", "secret": SECRET}}),
           "PROXY_WEBHOOK_ALL_JOBS": "false"}  # fmt: skip
    settings = load(env=env)
    assert settings.webhook_endpoints["ops"]["url"] == "http://h/x"
    assert settings.webhook_all_jobs is False


# -- across replicas, on a real Redis server ----------------------------------------------------


def redis_webhook_env(redis: Any, receiver: Receiver) -> dict[str, str]:
    return {
        "PROXY_CACHE_BACKEND": "redis", "PROXY_REDIS_URL": redis.url,
        "PROXY_CACHE_KEY_SECRET": "shared-by-replicas", "PROXY_LOG_LEVEL": "warning",
        "PROXY_WEBHOOK_URL": receiver.url, "PROXY_WEBHOOK_SECRET": SECRET,
        "PROXY_WEBHOOK_POLL_SECONDS": "0.1",
    }  # fmt: skip


def followed_in_redis(redis: Any) -> int:
    return int(redis.command("HLEN", "bvp:wh:jobs").strip()[1:])


def test_a_replica_killed_while_following_and_the_other_delivers(
    upstream: Upstream, receiver: Receiver, tmp_path: Any
) -> None:
    import signal

    from tests.redis_server import redis_server

    with redis_server() as redis:
        env = redis_webhook_env(redis, receiver)
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            video = create_followed(a.url)
            assert followed_in_redis(redis) == 1
            a.process.send_signal(signal.SIGKILL)  # dies holding the lease
            a.process.wait(10)
            upstream.clock.advance(31)
            wait_until(lambda: len(receiver.deliveries) == 1, timeout=15, what="B delivers")
            assert verified(receiver.deliveries[0])["data"]["id"] == video
            wait_until(lambda: followed_in_redis(redis) == 0, what="forgotten once delivered")
            assert httpx.get(b.url + "/healthz").status_code == 200
        assert len(receiver.deliveries) == 1
        secret_b64 = SECRET.removeprefix("whsec_")
        dump = redis.command("KEYS", "*")
        assert secret_b64.encode() not in dump and b"sk-bf-alice" not in dump


def test_two_replicas_deliver_each_event_once(
    upstream: Upstream, receiver: Receiver, tmp_path: Any
) -> None:
    from tests.redis_server import redis_server

    with redis_server() as redis:
        env = redis_webhook_env(redis, receiver)
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            videos = [
                create_followed(proxy.url, prompt=f"job {i}")
                for i, proxy in enumerate((a, b, a, b))
            ]
            stored = redis.command("HGETALL", "bvp:wh:jobs")
            assert b"sk-bf-alice" not in stored  # credentials are stored sealed
            upstream.clock.advance(31)
            wait_until(lambda: len(receiver.deliveries) == 4, timeout=15, what="four deliveries")
            wait_until(lambda: followed_in_redis(redis) == 0, what="all forgotten")
        assert sorted(verified(d)["data"]["id"] for d in receiver.deliveries) == sorted(videos)


def test_admin_lists_followed_jobs_and_events_and_redelivers(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    base = proxy_with_webhooks(make_proxy, receiver, admin_token="adm")
    admin = {"Authorization": "Bearer adm"}
    video = create_followed(base)
    wait_until(lambda: base.app.webhooks.follow_count() == 1)
    report = httpx.get(f"{base}/admin/webhooks", headers=admin).json()
    assert report["followed"] == [
        {"job_id": video, "endpoint": "default", "started": report["followed"][0]["started"],
         "here": True}
    ]  # fmt: skip
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 1)
    wait_until(lambda: httpx.get(f"{base}/admin/webhooks", headers=admin).json()["followed"] == [])
    (event,) = httpx.get(f"{base}/admin/webhooks", headers=admin).json()["events"]
    assert (event["job_id"], event["outcome"], event["attempts"]) == (video, "delivered", 1)
    r = httpx.post(f"{base}/admin/webhooks/events/{event['event_id']}/redeliver", headers=admin)
    assert r.json() == {"outcome": "delivered"}
    assert len(receiver.deliveries) == 2
    assert receiver.deliveries[1][0]["webhook-id"] == receiver.deliveries[0][0]["webhook-id"]
    verified(receiver.deliveries[1])
    assert (
        httpx.post(f"{base}/admin/webhooks/events/evt_nope/redeliver", headers=admin).status_code
        == 404
    )
    assert httpx.get(f"{base}/admin/webhooks").status_code == 401
    assert httpx.post(f"{base}/admin/webhooks", headers=admin).status_code == 405


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_webhook_admin_routes_do_not_exist_without_the_token(proxy: str, method: str) -> None:
    for path in ("/admin/webhooks", "/admin/webhooks/events/evt_1/redeliver"):
        assert httpx.request(method, proxy + path).status_code == 404


def test_retries_go_on_from_another_replica_when_the_delivering_one_dies(
    upstream: Upstream, receiver: Receiver, tmp_path: Any
) -> None:
    import signal

    from tests.redis_server import redis_server

    receiver.answers = [500, 500, 500]  # then 200
    with redis_server() as redis:
        env = {
            **redis_webhook_env(redis, receiver),
            "PROXY_WEBHOOK_RETRY_SCHEDULE": "0.5,0.5,0.5,0.5",
        }
        with run_replicas(upstream.url, env, tmp_path) as (a, _):
            create_followed(a.url)
            upstream.clock.advance(31)
            wait_until(lambda: len(receiver.deliveries) >= 1, what="A's first attempt (a 500)")
            a.process.send_signal(signal.SIGKILL)  # dies in the middle of its retries
            a.process.wait(10)
            wait_until(
                lambda: not receiver.answers and len(receiver.deliveries) >= 4,
                timeout=20,
                what="B retries until acknowledged",
            )
            wait_until(lambda: followed_in_redis(redis) == 0, what="done once acknowledged")
        assert len({h["webhook-id"] for h, _, _ in receiver.deliveries}) == 1
        assert all(verified(d) for d in receiver.deliveries)


def test_an_endpoint_can_be_limited_to_its_tenants(
    make_proxy: Any, upstream: Upstream, receiver: Receiver
) -> None:
    import hashlib

    ops = hashlib.sha256(b"Bearer sk-bf-alice").hexdigest()
    base = make_proxy(
        webhook_endpoints={"ops": {"url": receiver.url, "secrets": [SECRET], "tenants": [ops]}},
        webhook_poll_seconds=0.05,
    )
    calls = upstream.calls
    other = httpx.post(
        f"{base}/v1/videos",
        json={"model": "openai/sora-2", "prompt": "x"},
        headers={"Authorization": "Bearer sk-bf-bob", "X-Proxy-Webhook": "ops"},
    )
    assert_envelope(other, 400, "names no configured webhook endpoint")  # as if unknown
    assert upstream.calls == calls
    r = httpx.post(
        f"{base}/v1/videos",
        json={"model": "openai/sora-2", "prompt": "x"},
        headers={**ALICE, "X-Proxy-Webhook": "ops"},
    )
    assert r.status_code == 200
    upstream.clock.advance(31)
    wait_until(lambda: len(receiver.deliveries) == 1, what="the listed tenant's event")

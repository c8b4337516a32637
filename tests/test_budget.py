"""Budget guard (issue 24, part 1), over real sockets: per-tenant running-jobs and
video-seconds limits, checked before anything is sent upstream."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import Upstream
from tests.servers import run_proxy
from tests.test_metrics import scrape, value
from tests.test_proxy_core import ALICE, BOB, assert_envelope

MODEL = "gemini/veo-3.1-fast-generate-001"


def post(base: str, headers: dict[str, str] = ALICE, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": "a cat", **fields}
    return httpx.post(f"{base}/v1/videos", json=body, headers=headers, timeout=30)


def creates(upstream: Upstream) -> int:
    return sum(1 for r in upstream.sim.state.requests if r.method == "POST")


def test_the_running_jobs_limit_is_hit_and_freed(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(max_running_jobs_per_tenant=2, webhook_poll_seconds=2)
    first, second = post(base), post(base)
    assert first.headers["ratelimit-policy"] == '"jobs";q=2'
    assert (first.headers["ratelimit"], second.headers["ratelimit"]) == ('"jobs";r=1', '"jobs";r=0')
    made = creates(upstream)
    refused = post(base)
    assert_envelope(refused, 429, "running video jobs limit reached: 2 of 2")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["retry-after"] == "2"
    assert creates(upstream) == made  # nothing sent
    assert post(base, BOB).status_code == 200  # another tenant has its own limit
    upstream.clock.advance(31)  # both of Alice's jobs end; a poll sees one of them
    assert httpx.get(f"{base}/v1/videos/{first.json()['id']}", headers=ALICE).status_code == 200
    again = post(base)
    assert again.status_code == 200 and again.headers["ratelimit"] == '"jobs";r=0'
    # A delete through the proxy frees a slot too; a job stops counting at the deadline.
    assert httpx.delete(f"{base}/v1/videos/{again.json()['id']}", headers=ALICE).status_code == 200
    assert post(base).status_code == 200
    assert post(base).status_code == 429


def test_running_jobs_stop_counting_at_the_deadline(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(max_running_jobs_per_tenant=1, running_job_max_seconds=2)
    assert post(base).status_code == 200
    assert post(base).status_code == 429
    upstream.clock.advance(3)  # nobody polled it: it ends in the count by itself
    assert post(base).status_code == 200


def test_the_seconds_budget_and_what_gives_seconds_back(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(max_video_seconds_per_tenant=12, budget_window_seconds=3600)
    assert post(base, seconds="8").headers["ratelimit"] == '"video_seconds";r=4'
    over = post(base, seconds="8")
    assert_envelope(over, 429, "video seconds budget reached: 8 of 12")
    assert int(over.headers["retry-after"]) == 3600
    # A create the upstream refuses gives its seconds back.
    upstream.sim.state.faults.append(
        {
            "status": 400,
            "body": b'{"error":{"message":"no"}}',
            "headers": {"content-type": "application/json"},
        }
    )
    assert post(base, seconds="4").status_code == 400
    # A job that fails gives them back once seen failed.
    failing = post(base, seconds="4", prompt="please fail").json()["id"]
    assert post(base, seconds="4").status_code == 429
    upstream.clock.advance(31)
    assert httpx.get(f"{base}/v1/videos/{failing}", headers=ALICE).json()["status"] == "failed"
    assert post(base, seconds="4").status_code == 200
    # Past the window everything is free again.
    upstream.clock.advance(3601)
    assert post(base, seconds="12").status_code == 200


def test_a_create_naming_no_seconds_reserves_the_default_then_the_answers(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(max_video_seconds_per_tenant=10, default_video_seconds=8)
    first = post(base)  # no seconds: 8 reserved; the simulator answers "4"
    assert first.headers["ratelimit"] == '"video_seconds";r=2'
    assert post(base, seconds="6").status_code == 200  # 4 + 6 = 10: corrected to the answer


def test_an_idempotent_replay_never_counts_twice(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(max_running_jobs_per_tenant=1)
    key = {**ALICE, "Idempotency-Key": "budget-1"}
    first = post(base, key)
    replay = post(base, key)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert post(base).status_code == 429


def test_metrics_and_no_headers_without_limits(make_proxy: Any, upstream: Upstream) -> None:
    plain = make_proxy()
    assert "ratelimit" not in post(plain).headers
    base = make_proxy(max_running_jobs_per_tenant=1)
    job = post(base, prompt="a runware job", model="runware/vidu-q1").json()["id"]
    assert post(base).status_code == 429
    upstream.clock.advance(31)
    httpx.get(f"{base}/v1/videos/{job}", headers=ALICE)
    httpx.get(f"{base}/v1/videos/{job}", headers=ALICE)  # ended once, counted once
    m = scrape(base)
    assert value(m, "bifrost_proxy_budget_rejections_total", limit="running_jobs") >= 1
    assert (
        value(m, "bifrost_proxy_video_seconds_total", provider="runware", outcome="completed") == 4
    )
    assert value(m, "bifrost_proxy_video_cost_total", provider="runware") == 0.05
    assert value(m, "bifrost_proxy_running_jobs") == 0


def test_two_workers_never_let_a_tenant_past_its_limit(upstream: Upstream, tmp_path: Any) -> None:
    env = {"PROXY_MAX_RUNNING_JOBS_PER_TENANT": "3", "PROXY_LOG_LEVEL": "warning"}
    with run_proxy(upstream.url, "--workers", "2", env=env, tmp_path=tmp_path) as proc:

        def one(_: int) -> int:
            with httpx.Client() as client:  # a fresh connection: either worker
                body = {"model": MODEL, "prompt": "race"}
                return client.post(f"{proc.url}/v1/videos", json=body, headers=ALICE).status_code

        with ThreadPoolExecutor(25) as pool:
            statuses = list(pool.map(one, range(50)))
    assert statuses.count(200) == 3 and statuses.count(429) == 47
    assert creates(upstream) == 3


def test_two_replicas_on_redis_never_let_a_tenant_past_its_limit(
    upstream: Upstream, tmp_path: Any
) -> None:
    from tests.redis_server import redis_server
    from tests.servers import run_replicas
    from tests.test_redis_cache import redis_env

    with redis_server() as redis:
        env = {**redis_env(redis), "PROXY_MAX_RUNNING_JOBS_PER_TENANT": "3",
               "PROXY_MAX_VIDEO_SECONDS_PER_TENANT": "1000"}  # fmt: skip
        with run_replicas(upstream.url, env, tmp_path) as (a, b):

            def one(i: int) -> httpx.Response:
                return post((a, b)[i % 2].url, seconds="4")

            with ThreadPoolExecutor(25) as pool:
                answers = list(pool.map(one, range(50)))
            statuses = [r.status_code for r in answers]
            assert statuses.count(200) == 3 and statuses.count(429) == 47
            assert creates(upstream) == 3
            # A job seen ended on one replica frees the slot on the other.
            upstream.clock.advance(31)
            done = next(r.json()["id"] for r in answers if r.status_code == 200)
            assert httpx.get(f"{b.url}/v1/videos/{done}", headers=ALICE).status_code == 200
            accepted = post(a.url, seconds="4")
            assert accepted.status_code == 200
            assert accepted.headers["ratelimit"] == '"jobs";r=0, "video_seconds";r=984'
            m = scrape(a.url), scrape(b.url)
            running = sum(value(x, "bifrost_proxy_running_jobs") for x in m)
            assert running == 3  # one replica counts the shared store, the other reports 0


def test_while_redis_is_down_creates_follow_budget_fail_open(
    upstream: Upstream, tmp_path: Any
) -> None:
    from tests.redis_server import redis_server
    from tests.test_redis_cache import redis_env

    with redis_server() as redis:
        limited = {**redis_env(redis), "PROXY_MAX_RUNNING_JOBS_PER_TENANT": "1"}
        with (
            run_proxy(upstream.url, env=limited, tmp_path=tmp_path) as open_,
            run_proxy(
                upstream.url, env={**limited, "PROXY_BUDGET_FAIL_OPEN": "false"}, tmp_path=tmp_path
            ) as closed,
        ):
            redis.stop()
            assert post(open_.url).status_code == 200
            assert post(open_.url).status_code == 200  # unchecked, and counted
            assert value(scrape(open_.url), "bifrost_proxy_budget_unchecked_total") == 2
            refused = post(closed.url)
            assert_envelope(refused, 503, "budget cannot be checked")
            assert refused.headers["retry-after"] == "1"


def test_a_job_nobody_polls_still_leaves_the_count(make_proxy: Any, upstream: Upstream) -> None:
    from tests.servers import wait_until

    base = make_proxy(max_running_jobs_per_tenant=1, webhook_poll_seconds=0.05)
    assert post(base).status_code == 200
    assert base.app.budget.following() == 1  # the proxy follows the counted job itself
    assert post(base).status_code == 429
    upstream.clock.advance(31)  # it completes upstream; no client asks
    wait_until(lambda: base.app.budget.following() == 0, what="the follower to see it end")
    assert post(base).status_code == 200


def test_overrides_by_header_or_credential_hash_and_the_admin_view(
    make_proxy: Any, upstream: Upstream
) -> None:
    import hashlib

    bob_hash = hashlib.sha256(b"Bearer sk-bf-bob").hexdigest()
    base = make_proxy(
        max_running_jobs_per_tenant=1,
        budget_tenant_header="x-app-name",
        budget_overrides={"batch": {"max_running_jobs": 2}, bob_hash: {"max_running_jobs": 3}},
        admin_token="adm",
    )
    batch = {**ALICE, "x-app-name": "batch"}
    assert [post(base, batch).status_code for _ in range(3)] == [200, 200, 429]
    assert [post(base, BOB).status_code for _ in range(4)] == [200, 200, 200, 429]
    carol = {"Authorization": "Bearer sk-bf-carol"}
    assert [post(base, carol).status_code for _ in range(2)] == [200, 429]  # the default
    admin = httpx.get(f"{base}/admin/tenants", headers={"Authorization": "Bearer adm"}).json()
    assert [t["running_jobs"] for t in admin["tenants"]] == [3, 2, 1]
    assert "sk-bf" not in str(admin)  # fingerprints, never credentials
    assert (
        httpx.get(f"{base}/admin/tenants", headers={"Authorization": "Bearer no"}).status_code
        == 401
    )
    assert httpx.get(f"{make_proxy()}/admin/tenants").status_code == 404


def test_remixes_and_edits_count_like_creates(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(max_running_jobs_per_tenant=2)
    source = post(base, model="runware/vidu-q1").json()["id"]
    edit = httpx.post(
        f"{base}/v1/videos/edits", json={"prompt": "p", "video": {"id": source}}, headers=ALICE
    )
    assert edit.status_code == 200 and edit.headers["ratelimit"] == '"jobs";r=0'
    remix = httpx.post(f"{base}/v1/videos/{source}/remix", json={"prompt": "b"}, headers=ALICE)
    assert_envelope(remix, 429, "running video jobs limit reached: 2 of 2")


def test_the_openai_sdk_sees_a_rate_limit_error_on_its_family(
    make_proxy: Any, upstream: Upstream
) -> None:
    import openai

    from tests.test_openai_sdk import sdk

    client = sdk(make_proxy(max_running_jobs_per_tenant=1), "/openai/v1")
    first = client.videos.with_raw_response.create(model=MODEL, prompt="a cat")
    assert first.headers["ratelimit"] == '"jobs";r=0'
    try:
        client.videos.create(model=MODEL, prompt="again")
    except openai.RateLimitError as exc:
        assert exc.status_code == 429 and "running video jobs limit" in str(exc)
    else:
        raise AssertionError("the second create was accepted")

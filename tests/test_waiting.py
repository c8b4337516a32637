"""Waiting instead of polling: long-poll retrieve (Prefer: wait=N), SSE status streams
and stale-if-error, over real sockets with the simulator behind the proxy.

The proxy shares the simulator's test clock: a job moves only when a test advances it,
and the watcher (polling every poll_coalesce_seconds of real time) then sees it."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyURL, Upstream
from tests.rawhttp import connect, read_response
from tests.servers import wait_until
from tests.test_openai_sdk import sdk
from tests.test_proxy_core import ALICE, BOB, assert_envelope, create

FAMILIES = ["/v1", "/openai/v1"]


@pytest.fixture
def waiting(make_proxy: Any) -> ProxyURL:
    return make_proxy(poll_coalesce_seconds=0.05)  # type: ignore[no-any-return]


def in_background(call: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


def waiters(base: ProxyURL) -> int:
    return base.app.watchers.waiters


@pytest.mark.parametrize("prefix", FAMILIES)
def test_long_poll_answers_when_the_job_completes(
    waiting: ProxyURL, upstream: Upstream, prefix: str
) -> None:
    video = create(waiting)["id"]
    url = f"{waiting}{prefix}/videos/{video}"
    headers = {**ALICE, "Prefer": "wait=30"}
    thread, out = in_background(lambda: httpx.get(url, headers=headers, timeout=60))
    wait_until(lambda: waiters(waiting) == 1, what="the long-poll waits")
    calls = upstream.calls
    upstream.clock.advance(31)  # queued 10 s + in progress 20 s: completed
    thread.join(30)
    (r,) = out
    assert r.status_code == 200 and r.json()["status"] == "completed"
    assert r.headers["preference-applied"] == "wait=30"
    assert r.json()["id"] == video
    assert upstream.calls - calls <= 2  # the watcher's poll, not one per waiter
    wait_until(lambda: waiters(waiting) == 0 and len(waiting.app.watchers) == 0)


def test_many_waiters_one_upstream_poll_per_interval(waiting: ProxyURL, upstream: Upstream) -> None:
    video = create(waiting)["id"]
    url = f"{waiting}/v1/videos/{video}"
    threads = [
        in_background(lambda: httpx.get(url, headers={**ALICE, "Prefer": "wait=30"}, timeout=60))
        for _ in range(40)
    ]
    wait_until(lambda: waiters(waiting) == 40, what="40 waiters")
    calls = upstream.calls
    upstream.clock.advance(31)
    for thread, _ in threads:
        thread.join(30)
    assert all(out[0].json()["status"] == "completed" for _, out in threads)
    assert upstream.calls - calls <= 2
    assert len(waiting.app.watchers) == 0


def test_long_poll_times_out_with_the_latest_snapshot(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05, max_wait_seconds=1)
    video = create(base)["id"]
    r = httpx.get(f"{base}/v1/videos/{video}", headers={**ALICE, "Prefer": "wait=600"})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert r.headers["preference-applied"] == "wait=1"  # capped by max_wait_seconds


def test_terminal_jobs_and_odd_prefer_are_answered_at_once(
    waiting: ProxyURL, upstream: Upstream
) -> None:
    video = create(waiting)["id"]
    upstream.clock.advance(31)
    url = f"{waiting}/v1/videos/{video}"
    r = httpx.get(url, headers={**ALICE, "Prefer": "wait=30"})
    assert r.json()["status"] == "completed" and r.headers["preference-applied"] == "wait=30"
    for odd in ("wait=abc", "wait", "respond-async", "wait=-1", ""):
        r = httpx.get(url, headers={**ALICE, "Prefer": odd})
        assert r.status_code == 200 and "preference-applied" not in r.headers, odd
    assert waiters(waiting) == 0


def test_a_client_that_hangs_up_is_dropped_at_once(waiting: ProxyURL, upstream: Upstream) -> None:
    video = create(waiting)["id"]
    with connect(waiting) as sock:
        sock.sendall(
            f"GET /v1/videos/{video} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-bf-alice\r\n"
            "Prefer: wait=60\r\n\r\n".encode()
        )
        wait_until(lambda: waiters(waiting) == 1, what="waiting")
    wait_until(lambda: waiters(waiting) == 0, timeout=2, what="the waiter dropped")
    wait_until(lambda: len(waiting.app.watchers) == 0, timeout=2, what="the watcher stopped")


def test_past_max_waiters_a_long_poll_is_a_plain_poll(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05, max_waiters=1)
    video = create(base)["id"]
    url = f"{base}/v1/videos/{video}"
    thread, out = in_background(
        lambda: httpx.get(url, headers={**ALICE, "Prefer": "wait=30"}, timeout=60)
    )
    wait_until(lambda: waiters(base) == 1)
    r = httpx.get(url, headers={**ALICE, "Prefer": "wait=30"})
    assert r.json()["status"] == "queued"  # at once
    upstream.clock.advance(31)
    thread.join(30)
    assert out[0].json()["status"] == "completed"


def test_tenants_never_share_a_watcher(waiting: ProxyURL, upstream: Upstream) -> None:
    video = create(waiting)["id"]
    r = httpx.get(f"{waiting}/v1/videos/{video}", headers={**BOB, "Prefer": "wait=5"})
    assert r.status_code == 404  # Bob's poll is Bob's: the upstream's answer to him
    assert waiters(waiting) == 0


def test_openai_sdk_long_poll(waiting: ProxyURL, upstream: Upstream) -> None:
    client = sdk(waiting, "/v1")
    video = client.videos.create(model="openai/sora-2", prompt="a cat")
    thread, out = in_background(
        lambda: client.videos.retrieve(video.id, extra_headers={"Prefer": "wait=30"})
    )
    wait_until(lambda: waiters(waiting) == 1)
    upstream.clock.advance(31)
    thread.join(30)
    assert out[0].status == "completed"


# -- SSE ----------------------------------------------------------------------------------------


def read_events(response: httpx.Response) -> list[dict[str, Any]]:
    events, current = [], {}
    for line in response.iter_lines():
        if line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line.startswith(":"):
            events.append({"comment": line})
        elif not line and current:
            events.append(current)
            current = {}
    return events


@pytest.mark.parametrize("prefix", FAMILIES)
def test_sse_stream_follows_the_job_to_the_end(
    make_proxy: Any, upstream: Upstream, prefix: str
) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05, sse_keepalive_seconds=0.2)
    video = create(base)["id"]
    got: list[dict[str, Any]] = []

    def stream() -> None:
        with httpx.stream(
            "GET", f"{base}{prefix}/videos/{video}/events", headers=ALICE, timeout=60
        ) as r:
            assert r.headers["content-type"] == "text/event-stream"
            got.extend(read_events(r))

    thread = threading.Thread(target=stream)
    thread.start()
    wait_until(lambda: waiters(base) == 1, what="the stream waits")
    upstream.clock.advance(15)  # in progress
    wait_until(
        lambda: (
            base.app.watchers._watches
            and next(iter(base.app.watchers._watches.values())).state[0] == "in_progress"
        )
    )
    upstream.clock.advance(20)  # completed
    thread.join(30)
    statuses = [e["data"]["status"] for e in got if "data" in e]
    assert statuses == ["queued", "in_progress", "completed"]
    assert all(e["data"]["id"] == video for e in got if "data" in e)
    assert len({e["id"] for e in got if "id" in e}) == 3
    assert waiters(base) == 0
    # A reconnect naming the last event gets nothing again: the stream just ends.
    last = [e["id"] for e in got if "id" in e][-1]
    with httpx.stream(
        "GET", f"{base}{prefix}/videos/{video}/events", headers={**ALICE, "Last-Event-ID": last}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        assert [e for e in read_events(r) if "data" in e] == []


def test_sse_on_a_cached_terminal_job_is_one_event(proxy: ProxyURL, upstream: Upstream) -> None:
    """A cached (HIT) answer behind the events route is not memoised as a plain answer."""
    video = create(proxy)["id"]
    upstream.clock.advance(31)
    for expected in ("MISS", "HIT"):
        got = httpx.get(f"{proxy}/v1/videos/{video}", headers=ALICE)
        assert got.headers["x-cache-status"] == expected
    for _ in range(2):  # the second would be the memoised fast path, if it were one
        with httpx.stream("GET", f"{proxy}/v1/videos/{video}/events", headers=ALICE) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
            events = [e for e in read_events(r) if "data" in e]
        assert [e["data"]["status"] for e in events] == ["completed"]


def test_sse_keepalive_comments(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(poll_coalesce_seconds=0.05, sse_keepalive_seconds=0.05)
    video = create(base)["id"]
    with httpx.stream("GET", f"{base}/v1/videos/{video}/events", headers=ALICE, timeout=30) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
    assert ": keepalive" in seen


def test_sse_bad_id_and_unknown_job_are_ordinary_answers(
    waiting: ProxyURL, upstream: Upstream
) -> None:
    assert_envelope(httpx.get(f"{waiting}/v1/videos/not-an-id:/events"), 400, "id:provider")
    assert upstream.calls == 0
    r = httpx.get(f"{waiting}/v1/videos/video_nope:openai/events", headers=ALICE)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"


# -- stale-if-error -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", FAMILIES)
def test_stale_if_error_serves_a_running_snapshot(
    make_proxy: Any, upstream: Upstream, prefix: str
) -> None:
    base = make_proxy(poll_coalesce_seconds=1, stale_if_error_seconds=60)
    video = create(base)["id"]
    url = f"{base}{prefix}/videos/{video}"
    assert httpx.get(url, headers=ALICE).headers["x-cache-status"] == "MISS"
    upstream.clock.advance(5)  # the coalesced entry expired; still queued upstream
    upstream.sim.state.faults.append({"status": 503, "body": b'{"error":"busy"}'})
    r = httpx.get(url, headers=ALICE)
    assert (r.status_code, r.headers["x-cache-status"]) == (200, "STALE")
    assert r.json()["status"] == "queued" and int(r.headers["age"]) == 5
    upstream.clock.advance(60)  # past the window: the error passes through
    upstream.sim.state.faults.append({"status": 503, "body": b'{"error":"busy"}'})
    assert httpx.get(url, headers=ALICE).status_code == 503


def test_stale_if_error_never_for_other_tenants_or_when_off(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(poll_coalesce_seconds=1, stale_if_error_seconds=0)
    video = create(base)["id"]
    url = f"{base}/v1/videos/{video}"
    httpx.get(url, headers=ALICE)
    upstream.clock.advance(5)
    upstream.sim.state.faults.append({"status": 503, "body": b"{}"})
    assert httpx.get(url, headers=ALICE).status_code == 503


def test_stale_answers_are_counted(make_proxy: Any, upstream: Upstream) -> None:
    from tests.test_metrics import scrape, value

    base = make_proxy(poll_coalesce_seconds=1)
    video = create(base)["id"]
    httpx.get(f"{base}/v1/videos/{video}", headers=ALICE)
    before = value(scrape(base), "bifrost_proxy_cache_requests_total", result="stale")
    upstream.clock.advance(5)
    upstream.sim.state.faults.append({"status": 502, "body": b"{}"})
    assert (
        httpx.get(f"{base}/v1/videos/{video}", headers=ALICE).headers["x-cache-status"] == "STALE"
    )
    assert value(scrape(base), "bifrost_proxy_cache_requests_total", result="stale") == before + 1
    with connect(base) as sock:  # nothing else changed in how a plain poll is framed
        sock.sendall(f"GET /v1/videos/{video} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        assert read_response(sock).status == 404


def test_long_poll_with_two_workers(upstream: Upstream, tmp_path: Any) -> None:
    from tests.servers import run_proxy
    from tests.test_metrics import scrape, value

    env = {"PROXY_POLL_COALESCE_SECONDS": "0.05"}
    with run_proxy(upstream.url, "--workers", "2", env=env, tmp_path=tmp_path) as proc:
        video = create(proc.url)["id"]
        url = f"{proc.url}/v1/videos/{video}"
        threads = [
            in_background(
                lambda: httpx.get(url, headers={**ALICE, "Prefer": "wait=30"}, timeout=60)
            )
            for _ in range(6)
        ]
        # The gauge sums both workers, whichever answers the scrape.
        wait_until(lambda: value(scrape(proc.url), "bifrost_proxy_waiters", kind="long_poll") == 6)
        upstream.clock.advance(31)
        for thread, _ in threads:
            thread.join(30)
        assert [out[0].json()["status"] for _, out in threads] == ["completed"] * 6
        wait_until(lambda: value(scrape(proc.url), "bifrost_proxy_waiters", kind="long_poll") == 0)


def test_sigterm_answers_waiting_clients_at_once(upstream: Upstream, tmp_path: Any) -> None:
    """A graceful stop does not wait out long-polls: each gets the latest snapshot."""
    import signal
    import time

    from tests.servers import run_proxy

    env = {"PROXY_POLL_COALESCE_SECONDS": "0.05", "PROXY_SHUTDOWN_GRACE_SECONDS": "30"}
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as proc:
        video = create(proc.url)["id"]
        url = f"{proc.url}/v1/videos/{video}"
        thread, out = in_background(
            lambda: httpx.get(url, headers={**ALICE, "Prefer": "wait=60"}, timeout=70)
        )
        from tests.test_metrics import scrape, value

        wait_until(lambda: value(scrape(proc.url), "bifrost_proxy_waiters", kind="long_poll") == 1)
        started = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        thread.join(20)
        assert out and out[0].status_code == 200 and out[0].json()["status"] == "queued"
        assert proc.process.wait(20) == 0
        assert time.monotonic() - started < 10  # not the 60 s wait, nor the 30 s grace

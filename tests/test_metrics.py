"""Metrics, the access log and the operator assets, against real proxy processes."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Upstream
from tests.servers import ProxyProcess, free_port, run_proxy
from tests.test_proxy_core import ALICE, create

ROOT = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def quiet_proxy(upstream: Upstream, tmp_path: Any) -> Any:
    env = {"PROXY_POLL_COALESCE_SECONDS": "0"}
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as proc:
        yield proc


def test_job_lifecycle_counts_each_transition_once(
    quiet_proxy: ProxyProcess, upstream: Upstream
) -> None:
    base = quiet_proxy.url
    vid = create(base)["id"]
    polls = 0

    def poll(n: int) -> None:
        nonlocal polls
        for _ in range(n):
            assert httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE).status_code == 200
            polls += 1

    poll(5)
    upstream.clock.advance(15)
    poll(5)
    assert httpx.get(f"{base}/v1/videos?provider=openai", headers=ALICE).status_code == 200
    upstream.clock.advance(30)
    poll(5)
    poll(10)  # polls after completion: HITs
    m = scrape(base)
    t = "bifrost_proxy_video_status_transitions_total"
    assert value(m, t, provider="openai", from_status="none", to_status="queued") == 1
    assert value(m, t, provider="openai", from_status="queued", to_status="in_progress") == 1
    assert value(m, t, provider="openai", from_status="in_progress", to_status="completed") == 1
    assert sum(v for (name, _), v in m.items() if name == t) == 3
    assert (
        value(
            m,
            "bifrost_proxy_video_job_duration_seconds_count",
            provider="openai",
            outcome="completed",
        )
        == 1
    )
    assert (
        value(
            m,
            "bifrost_proxy_video_job_duration_seconds_sum",
            provider="openai",
            outcome="completed",
        )
        == 30
    )
    assert (
        value(
            m,
            "bifrost_proxy_requests_total",
            route="/v1/videos/{video_id}",
            method="GET",
            status="200",
        )
        == polls
    )
    assert (
        value(m, "bifrost_proxy_requests_total", route="/v1/videos", method="POST", status="200")
        == 1
    )
    hits = value(m, "bifrost_proxy_cache_requests_total", result="hit")
    assert hits == 14 and value(m, "bifrost_proxy_cache_requests_total", result="miss") == 11
    assert value(m, "bifrost_proxy_upstream_calls_saved_total") == hits
    assert value(m, "bifrost_proxy_cache_entries") == 1
    assert value(m, "bifrost_proxy_build_info", version="0.1.0") == 1
    assert value(m, "bifrost_proxy_inflight_requests") == 1  # the scrape itself
    assert (
        value(
            m,
            "bifrost_proxy_request_duration_seconds_count",
            route="/v1/videos/{video_id}",
            method="GET",
            cache="hit",
        )
        == 14
    )
    assert (
        value(
            m,
            "bifrost_proxy_upstream_request_duration_seconds_count",
            route="/v1/videos/{video_id}",
            method="GET",
            status="200",
        )
        == 11
    )


def test_list_items_reveal_transitions(quiet_proxy: ProxyProcess, upstream: Upstream) -> None:
    base = quiet_proxy.url
    create(base, model="replicate/minimax-video")
    upstream.clock.advance(100)
    httpx.get(f"{base}/v1/videos?provider=replicate", headers=ALICE)
    httpx.get(f"{base}/v1/videos?provider=replicate", headers=ALICE)
    m = scrape(base)
    t = "bifrost_proxy_video_status_transitions_total"
    assert value(m, t, provider="replicate", from_status="queued", to_status="completed") == 1


def test_no_series_per_id_or_path(quiet_proxy: ProxyProcess) -> None:
    base = quiet_proxy.url
    with httpx.Client() as client:
        for i in range(3):  # create each kind of series once
            client.get(f"{base}/v1/videos/warm{i}:openai")
            client.get(f"{base}/junk/warm{i}")
            client.get(f"{base}/v1/videos/bad{i}")
            scrape(base)
        before = set(scrape(base))
        for i in range(1000):
            client.get(f"{base}/v1/videos/video_{i}:openai")
            client.get(f"{base}/random/{i}/path?x={i}")
            client.get(f"{base}/v1/videos/nocolon{i}")
    after = set(scrape(base))
    assert after == before
    text = httpx.get(base + "/metrics").text
    assert "video_999" not in text and "random" not in text and "sk-bf" not in text


def test_openmetrics_when_asked(proxy_process: ProxyProcess) -> None:
    r = httpx.get(
        proxy_process.url + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    plain = httpx.get(proxy_process.url + "/metrics")
    assert plain.headers["content-type"].startswith("text/plain")


def test_two_workers_every_scrape_sums_both(upstream: Upstream, tmp_path: Any) -> None:
    pattern = os.path.join(tempfile.gettempdir(), "bifrost-video-proxy-metrics-*")
    dirs_before = set(glob.glob(pattern))
    with run_proxy(upstream.url, "--workers", "2", tmp_path=tmp_path) as proc:
        for _ in range(40):  # new connections: the kernel spreads them over both workers
            assert httpx.get(proc.url + "/healthz").status_code == 200
        seen = set()
        for _ in range(8):  # each scrape may be answered by either worker
            m = scrape(proc.url)
            seen.add(
                value(
                    m, "bifrost_proxy_requests_total", route="/healthz", method="GET", status="200"
                )
            )
        assert len(seen) == 1 and seen.pop() >= 40  # the same sum, whoever answered
        m = scrape(proc.url)
        assert value(m, "bifrost_proxy_build_info", version="0.1.0") == 1
        assert len(set(glob.glob(pattern)) - dirs_before) == 1
    assert set(glob.glob(pattern)) == dirs_before  # removed at exit


def test_separate_metrics_port(upstream: Upstream, tmp_path: Any) -> None:
    port = free_port()
    with run_proxy(
        upstream.url,
        "--metrics-port",
        str(port),
        env={"PROXY_ADMIN_TOKEN": "adm"},
        tmp_path=tmp_path,
    ) as proc:
        metrics_url = f"http://127.0.0.1:{port}"
        series = {"route": "/healthz", "method": "GET", "status": "200"}
        before = value(scrape(metrics_url), "bifrost_proxy_requests_total", **series)
        assert httpx.get(proc.url + "/healthz").status_code == 200
        assert value(scrape(metrics_url), "bifrost_proxy_requests_total", **series) == before + 1
        assert httpx.get(proc.url + "/metrics").status_code == 404
        r = httpx.delete(metrics_url + "/admin/cache", headers={"Authorization": "Bearer adm"})
        assert "purged" not in r.text  # the admin routes do not exist there


def test_access_log_lines(upstream: Upstream, tmp_path: Any) -> None:
    secrets = ["sk-bf-SECRETVALUE1", "XAPIKEYSECRET2", "GOOGSECRET3", "QUERYSECRET4", "EHSECRET5"]
    with run_proxy(upstream.url, tmp_path=tmp_path) as proc:
        headers = {
            "Authorization": f"Bearer {secrets[0]}", "x-api-key": secrets[1], "x-goog-api-key": secrets[2],
            "x-bf-eh-token": secrets[4], "X-Request-ID": "trace-me",
        }  # fmt: skip
        vid = create(proc.url, headers=headers)["id"]
        httpx.get(f"{proc.url}/v1/videos/{vid}?api_key={secrets[3]}", headers=headers)
        httpx.get(f"{proc.url}/v1/videos/bad?key={secrets[3]}", headers=headers)
        httpx.get(f"{proc.url}/v1/chat?token={secrets[3]}", headers=headers)
    log = proc.log()  # after a graceful stop: buffered access lines are flushed
    for secret in secrets:
        assert secret not in log
    assert vid not in log
    lines = [
        json.loads(line) for line in log.splitlines() if line.startswith("{") and '"access"' in line
    ]
    retrieve = next(
        line for line in lines if line["route"] == "/v1/videos/{video_id}" and line["status"] == 200
    )
    assert set(retrieve) >= {
        "time",
        "method",
        "route",
        "status",
        "duration_ms",
        "cache",
        "upstream_ms",
        "request_id",
        "provider",
    }
    assert (retrieve["cache"], retrieve["provider"], retrieve["request_id"]) == (
        "MISS",
        "openai",
        "trace-me",
    )


def test_text_log_format(upstream: Upstream, tmp_path: Any) -> None:
    with run_proxy(upstream.url, "--log-format", "text", tmp_path=tmp_path) as proc:
        httpx.get(proc.url + "/healthz")
    log = proc.log()
    assert re.search(r"GET /healthz 200 [0-9.]+ms", log)


# -- operator assets ---------------------------------------------------------------------------
def promtool() -> str:
    """promtool from PATH; else install Debian's prometheus package (CI does it up front)."""
    found = shutil.which("promtool")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        check=True,
        env=env,
        timeout=600,
    )
    found = shutil.which("promtool")
    assert found, "promtool not found after installing Debian's prometheus package"
    return found


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ROOT / "config/prometheus/alerts.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_every_metric_in_alerts_and_dashboard_is_exposed(proxy_process: ProxyProcess) -> None:
    text = httpx.get(proxy_process.url + "/metrics").text
    exposed = set(re.findall(r"bifrost_proxy_[a-z_]+", text))
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            exposed |= {family.name + "_bucket", family.name + "_sum", family.name + "_count"}
    used = set()
    for path in ("config/prometheus/alerts.yml", "config/grafana/dashboard.json"):
        used |= set(re.findall(r"bifrost_proxy_[a-z_]+", (ROOT / path).read_text()))
    assert used and used <= exposed, used - exposed
    dashboard = json.loads((ROOT / "config/grafana/dashboard.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("latency", "status", "hit ratio", "saved", "transitions", "duration",
                  "content store"):  # fmt: skip
        assert topic in titles


def test_fast_path_hits_are_logged_and_counted(upstream: Upstream, tmp_path: Any) -> None:
    from tests.servers import wait_until

    with run_proxy(upstream.url, tmp_path=tmp_path) as proc:
        vid = create(proc.url)["id"]
        upstream.clock.advance(31)
        for i in range(6):
            httpx.get(f"{proc.url}/v1/videos/{vid}", headers={**ALICE, "X-Request-ID": f"hit-{i}"})

        def logged() -> bool:
            return '"request_id":"hit-5"' in proc.log()

        wait_until(logged, timeout=5, what="buffered HIT access line")
        line = next(json.loads(x) for x in proc.log().splitlines() if '"hit-5"' in x)
        assert (line["cache"], line["status"], line["provider"], line["route"]) == (
            "HIT",
            200,
            "openai",
            "/v1/videos/{video_id}",
        )
        m = scrape(proc.url)
        assert value(m, "bifrost_proxy_cache_requests_total", result="hit") == 5
        assert (
            value(
                m,
                "bifrost_proxy_request_duration_seconds_count",
                route="/v1/videos/{video_id}",
                method="GET",
                cache="hit",
            )
            == 5
        )

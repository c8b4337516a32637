"""Fault injection: for each way the upstream misbehaves, the exact status the client
gets, that nothing wrong is cached, and that the proxy serves normally afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.chaos import Chaos, chaos_upstream
from tests.servers import wait_until
from tests.test_proxy_core import assert_envelope

VIDEO = "/v1/videos/video_1:openai"


@pytest.fixture
def chaos() -> Iterator[Chaos]:
    with chaos_upstream() as upstream:
        yield upstream


@pytest.fixture
def chaos_proxy(make_proxy: Any, chaos: Chaos) -> Any:
    return make_proxy(
        upstream_url=chaos.url, upstream_timeout_seconds=0.5, content_timeout_seconds=0.5
    )


def recovers(base: str, chaos: Chaos) -> None:
    chaos.mode = "normal"
    r = httpx.get(base + VIDEO)
    assert (r.status_code, r.headers["x-cache-status"]) == (200, "MISS"), "a fault was cached"
    assert httpx.get(base + VIDEO).headers["x-cache-status"] == "HIT"
    assert httpx.get(base + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "mode, status, fragment",
    [
        ("silent", 504, "timed out"),
        ("stall_after_headers", 504, "timed out"),
        ("reset_mid_body", 502, "protocol"),
        ("short_body", 502, "protocol"),
    ],
)
def test_json_retrieve_faults(
    chaos_proxy: Any, chaos: Chaos, mode: str, status: int, fragment: str
) -> None:
    chaos.mode = mode
    assert_envelope(httpx.get(chaos_proxy + VIDEO, timeout=10), status, fragment)
    recovers(chaos_proxy, chaos)


def test_refused_connection(make_proxy: Any) -> None:
    from tests.servers import free_port

    base = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    assert_envelope(httpx.get(base + VIDEO), 502, "could not connect")


def test_slow_body_within_the_total_timeout_is_fine(make_proxy: Any, chaos: Chaos) -> None:
    base = make_proxy(upstream_url=chaos.url, upstream_timeout_seconds=5)
    chaos.mode, chaos.trickle_delay = "trickle", 0.002
    r = httpx.get(base + VIDEO)
    assert r.status_code == 200 and r.content == chaos.body
    chaos.mode, chaos.trickle_delay = "trickle", 0.05  # 80 bytes x 50 ms > 0.5 s total
    slow = make_proxy(upstream_url=chaos.url, upstream_timeout_seconds=0.5)
    assert_envelope(httpx.get(slow + VIDEO, timeout=10), 504, "timed out")
    recovers(slow, chaos)


@pytest.mark.parametrize("mode", ["stall_after_headers", "reset_mid_body", "short_body"])
def test_download_faults_cut_the_answer_short(chaos_proxy: Any, chaos: Chaos, mode: str) -> None:
    chaos.body = b"\x00" * 200_000
    chaos.mode = mode
    # Headers were sent: the body must end visibly short.
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("GET", chaos_proxy + VIDEO + "/content", timeout=10) as r,
    ):
        assert r.status_code == 200
        b"".join(r.iter_raw())
    chaos.body = b"\x00" * 1000
    chaos.mode = "normal"
    assert httpx.get(chaos_proxy + VIDEO + "/content").content == chaos.body


def test_download_before_headers_times_out_with_504(chaos_proxy: Any, chaos: Chaos) -> None:
    chaos.mode = "silent"
    assert_envelope(httpx.get(chaos_proxy + VIDEO + "/content", timeout=10), 504, "timed out")


def test_slow_byte_by_byte_download_completes(make_proxy: Any, chaos: Chaos) -> None:
    base = make_proxy(upstream_url=chaos.url, content_timeout_seconds=1)
    chaos.body = bytes(range(256)) * 2
    chaos.mode, chaos.trickle_delay = "trickle", 0.001
    assert httpx.get(base + VIDEO + "/content", timeout=30).content == chaos.body


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_two_hundred_hang_ups_release_everything(make_proxy: Any, chaos: Chaos) -> None:
    base = make_proxy(upstream_url=chaos.url)
    chaos.body = b"\x00" * (4 * 1024 * 1024)
    chaos.mode = "normal"
    httpx.get(base + VIDEO + "/content")  # warm pools
    baseline = open_fds()
    for _ in range(200):
        with httpx.Client() as client, client.stream("GET", base + VIDEO + "/content") as r:
            next(r.iter_raw())  # read a little, then hang up
    wait_until(
        lambda: chaos.open_connections <= 2, timeout=10, what="upstream connections released"
    )
    wait_until(
        lambda: open_fds() <= baseline + 4, timeout=10, what="file descriptors back to baseline"
    )
    assert httpx.get(base + VIDEO + "/content").content == chaos.body


def test_sigterm_lets_a_running_download_finish(chaos: Chaos, tmp_path: Any) -> None:
    import signal
    import threading

    from tests.servers import run_proxy

    chaos.body = bytes(range(256)) * 8  # 2 KiB at ~1 ms a byte: a download of ~2 s
    chaos.mode, chaos.trickle_delay = "trickle", 0.001
    with run_proxy(chaos.url, tmp_path=tmp_path) as proc:
        received: list[bytes] = []
        first = threading.Event()

        def download() -> None:
            with httpx.stream("GET", proc.url + VIDEO + "/content", timeout=30) as r:
                for chunk in r.iter_raw():
                    received.append(chunk)
                    first.set()

        thread = threading.Thread(target=download)
        thread.start()
        assert first.wait(10)
        proc.process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert b"".join(received) == chaos.body  # finished, not cut
        assert proc.process.wait(30) == 0


def test_slow_headers_get_408_and_close(upstream: Any, tmp_path: Any) -> None:
    import socket
    import time

    from tests.servers import run_proxy

    env = {"PROXY_CLIENT_HEADER_TIMEOUT_SECONDS": "0.5"}
    with run_proxy(upstream.url, env=env, tmp_path=tmp_path) as proc:
        for prelude in (
            b"",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        ):  # first request, and a later one
            with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
                s.sendall(prelude + b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
                started = time.monotonic()
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert b"HTTP/1.1 408" in data and b"client_header_timeout_seconds" in data
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")

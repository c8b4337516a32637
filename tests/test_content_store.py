"""The content store (issue 23): videos served from the proxy, with Range, on disk.

Real sockets throughout: the proxy on uvicorn, the simulator or a raw-socket stand-in
upstream whose transfer the test holds, cuts short or releases.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.content.ranges import parse_range, plan
from proxy.content.store import storable_length
from proxy.simulator.app import expected_content
from tests.conftest import Upstream
from tests.servers import wait_until
from tests.test_proxy_core import ALICE, BOB, assert_envelope, create

SIZE = 256 * 1024  # the simulator's content_bytes


def content_gets(upstream: Upstream) -> int:
    return sum(1 for r in upstream.sim.state.requests if r.raw_path.endswith("/content"))


def completed(base: str, upstream: Upstream, headers: dict[str, str] = ALICE) -> str:
    """A job created and polled through the proxy until it is completed."""
    vid = str(create(base, headers=headers)["id"])
    upstream.clock.advance(31)
    assert httpx.get(f"{base}/v1/videos/{vid}", headers=headers).json()["status"] == "completed"
    return vid


def stored_files(base: Any) -> list[Path]:
    root = Path(base.app.settings.content_dir) / "objects"
    return [p for p in root.rglob("*") if p.is_file()]


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([\d.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


# -- pure rules: ranges, conditionals, what may be stored --------------------------------
@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (b"bytes=0-1", 100, (0, 2)),
        (b"bytes=10-", 100, (10, 100)),
        (b"bytes=-10", 100, (90, 100)),
        (b"bytes=-1000", 100, (0, 100)),
        (b"bytes=0-999999", 100, (0, 100)),
        (b"bytes=0-" + b"9" * 40, 100, (0, 100)),
        (b"bytes=99-99", 100, (99, 100)),
        (b"BYTES = 5-6", 100, (5, 7)),
        (b"bytes=100-", 100, "unsatisfiable"),
        (b"bytes=" + b"9" * 40 + b"-", 100, "unsatisfiable"),
        (b"bytes=-0", 100, "unsatisfiable"),
        (b"bytes=0-0", 0, "unsatisfiable"),
        (b"bytes=5-1", 100, None),  # invalid: ignored
        (b"bytes=0-1,5-6", 100, None),  # several: the whole object
        (b"items=0-1", 100, None),
        (b"bytes=a-b", 100, None),
        (b"bytes=-", 100, None),
        (b"bytes", 100, None),
    ],
)
def test_parse_range(header: bytes, size: int, expected: Any) -> None:
    assert parse_range(header, size) == expected


def test_conditionals() -> None:
    etag, lm = b'"abc"', b"Tue, 01 Dec 2026 10:00:00 GMT"

    def p(**kw: Any) -> tuple[int, int, int]:
        args = {"range_header": None, "if_range": None, "if_none_match": None, **kw}
        got = plan(100, etag, lm, **args)
        return got.status, got.start, got.end

    assert p() == (200, 0, 100)
    assert p(range_header=b"bytes=0-1") == (206, 0, 2)
    assert p(range_header=b"bytes=0-1", if_range=b'"abc"') == (206, 0, 2)
    assert p(range_header=b"bytes=0-1", if_range=b'"old"') == (200, 0, 100)
    assert p(range_header=b"bytes=0-1", if_range=b'W/"abc"') == (200, 0, 100)  # strong only
    assert p(range_header=b"bytes=0-1", if_range=lm) == (206, 0, 2)
    assert p(range_header=b"bytes=0-1", if_range=b"Mon, 30 Nov 2026 10:00:00 GMT")[0] == 200
    assert p(if_none_match=b'"x", "abc"')[0] == 304
    assert p(if_none_match=b'W/"abc"')[0] == 304  # weak comparison
    assert p(if_none_match=b"*")[0] == 304
    assert p(if_none_match=b'"x"')[0] == 200
    assert p(range_header=b"bytes=500-")[0] == 416


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [(b"content-length", b"10")], 10),
        (200, [(b"Content-Length", b"10"), (b"content-type", b"video/mp4")], 10),
        (404, [(b"content-length", b"10")], None),
        (206, [(b"content-length", b"10")], None),
        (200, [], None),  # no length: relayed
        (200, [(b"transfer-encoding", b"chunked")], None),
        (200, [(b"content-length", b"10"), (b"content-length", b"11")], None),
        (200, [(b"content-length", b"10"), (b"set-cookie", b"a=b")], None),
        (200, [(b"content-length", b"10"), (b"cache-control", b"no-store")], None),
        (200, [(b"content-length", b"10"), (b"cache-control", b"private, max-age=9")], None),
        (200, [(b"content-length", b"10"), (b"content-encoding", b"gzip")], None),
        (200, [(b"content-length", b"-1")], None),
    ],
)
def test_what_may_be_stored(status: int, headers: Any, expected: int | None) -> None:
    assert storable_length(status, headers) == expected


# -- the store over real sockets ---------------------------------------------------------
def test_the_second_download_is_a_hit_with_the_same_bytes_and_etag(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy()
    vid = completed(base, upstream)
    hits = metric(base, "bifrost_proxy_content_requests_total", '{result="hit"}')
    from_store = metric(base, "bifrost_proxy_content_bytes_total", '{source="store"}')
    expected = expected_content(vid.rpartition(":")[0], "video", SIZE)
    first = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert first.status_code == 200 and first.content == expected
    assert first.headers["x-cache-status"] == "MISS"
    assert first.headers["accept-ranges"] == "bytes"
    assert first.headers["content-type"] == "video/mp4"
    assert first.headers["content-length"] == str(SIZE)
    etag = first.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    wait_until(lambda: len(stored_files(base)) == 1, what="the object to be committed")
    # Both families share the stored object; the upstream is not asked again.
    for prefix in ("/v1/videos", "/openai/v1/videos"):
        again = httpx.get(f"{base}{prefix}/{vid}/content", headers=ALICE)
        assert again.content == expected and again.headers["x-cache-status"] == "HIT"
        assert again.headers["etag"] == etag and again.headers["content-type"] == "video/mp4"
    assert content_gets(upstream) == 1
    # HEAD of a stored object comes from the store.
    head = httpx.head(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(SIZE) and head.headers["etag"] == etag
    assert content_gets(upstream) == 1
    # Another variant is another object.
    thumb = httpx.get(f"{base}/v1/videos/{vid}/content?variant=thumbnail", headers=ALICE)
    assert thumb.headers["content-type"] == "image/webp" and thumb.headers["etag"] != etag
    assert content_gets(upstream) == 2
    assert metric(base, "bifrost_proxy_content_requests_total", '{result="hit"}') == hits + 3
    assert metric(base, "bifrost_proxy_content_bytes_total", '{source="store"}') == (
        from_store + 2 * SIZE
    )


def test_ranges_and_conditionals_from_the_store(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy()
    vid = completed(base, upstream)
    url = f"{base}/v1/videos/{vid}/content"
    ranges = metric(base, "bifrost_proxy_content_requests_total", '{result="range"}')
    expected = expected_content(vid.rpartition(":")[0], "video", SIZE)
    etag = httpx.get(url, headers=ALICE).headers["etag"]
    wait_until(lambda: len(stored_files(base)) == 1, what="the object to be committed")
    for header, start, end in (("bytes=0-1", 0, 2), ("bytes=1000-", 1000, SIZE),
                               ("bytes=-100", SIZE - 100, SIZE), ("bytes=5-9", 5, 10)):  # fmt: skip
        r = httpx.get(url, headers={**ALICE, "Range": header})
        assert r.status_code == 206, header
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
        assert r.content == expected[start:end] and r.headers["etag"] == etag
        assert r.headers["x-cache-status"] == "HIT"
    r = httpx.get(url, headers={**ALICE, "Range": f"bytes={SIZE}-"})
    assert_envelope(r, 416, "range not satisfiable")
    assert r.headers["content-range"] == f"bytes */{SIZE}"
    r = httpx.get(url, headers={**ALICE, "Range": "bytes=0-1,5-6"})
    assert r.status_code == 200 and r.content == expected
    r = httpx.get(url, headers={**ALICE, "Range": "bytes=0-1", "If-Range": etag})
    assert r.status_code == 206
    r = httpx.get(url, headers={**ALICE, "Range": "bytes=0-1", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == expected
    r = httpx.get(url, headers={**ALICE, "If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert content_gets(upstream) == 1
    assert metric(base, "bifrost_proxy_content_requests_total", '{result="range"}') == (
        ranges + 6  # four 206 answers, one 416, one 206 under If-Range
    )


def test_another_tenant_never_gets_a_stored_byte(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy()
    vid = completed(base, upstream)
    assert httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE).status_code == 200
    wait_until(lambda: len(stored_files(base)) == 1, what="the object to be committed")
    unknown = "video_" + "9" * 24 + ":" + vid.rpartition(":")[2]
    for method in ("GET", "HEAD"):
        theirs = httpx.request(method, f"{base}/v1/videos/{vid}/content", headers=BOB)
        none = httpx.request(method, f"{base}/v1/videos/{unknown}/content", headers=BOB)
        assert theirs.status_code == none.status_code == 404, method
        assert theirs.headers.get("x-cache-status") == none.headers.get("x-cache-status")
        assert set(theirs.headers) == set(none.headers) and "etag" not in theirs.headers
        if method == "GET":
            assert theirs.json()["error"].keys() == none.json()["error"].keys()
            assert len(theirs.content) < 1000  # an error envelope, not a stored byte
    # Ranges are no way around it either.
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers={**BOB, "Range": "bytes=0-1"})
    assert r.status_code == 404


def test_content_of_a_job_not_seen_completed_is_relayed_unstored(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy()
    vid = create(base)["id"]
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)  # queued: not ready
    assert r.status_code == 400 and r.headers["x-cache-status"] == "BYPASS"
    upstream.clock.advance(31)  # completed upstream, but the proxy has not seen it
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert r.status_code == 200 and r.headers["x-cache-status"] == "BYPASS"
    assert stored_files(base) == []
    # A query the store does not key on is relayed too (as a retrieve's query is).
    httpx.get(f"{base}/v1/videos/{vid}", headers=ALICE)
    r = httpx.get(f"{base}/v1/videos/{vid}/content?variant=video&x=1", headers=ALICE)
    assert r.headers["x-cache-status"] == "BYPASS" and stored_files(base) == []


def test_off_is_todays_relay(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy(content_cache="off")
    vid = completed(base, upstream)
    for _ in range(2):
        r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
        assert r.status_code == 200 and "x-cache-status" not in r.headers
    assert content_gets(upstream) == 2


def test_a_delete_and_the_admin_purge_remove_stored_content(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(admin_token="t0ken")
    vid = completed(base, upstream)
    other = completed(base, upstream)
    for job in (vid, other):
        for variant in ("video", "thumbnail"):
            httpx.get(f"{base}/v1/videos/{job}/content?variant={variant}", headers=ALICE)
    wait_until(lambda: len(stored_files(base)) == 4, what="four objects")
    assert httpx.delete(f"{base}/v1/videos/{vid}", headers=ALICE).status_code == 200
    assert len(stored_files(base)) == 2  # both variants of the deleted job, at once
    admin = {"Authorization": "Bearer t0ken"}
    purged = httpx.delete(f"{base}/admin/cache", headers=admin).json()
    assert purged["content_purged"] == 2 and stored_files(base) == []
    before = content_gets(upstream)
    r = httpx.get(f"{base}/v1/videos/{other}/content", headers=ALICE)
    assert r.headers["x-cache-status"] == "MISS" and content_gets(upstream) == before + 1


def test_least_recently_used_videos_are_evicted_under_the_bound(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(content_max_bytes=3 * SIZE)  # two videos and their headers fit
    evicted = metric(base, "bifrost_proxy_content_evictions_total")
    jobs = [completed(base, upstream) for _ in range(3)]
    for n, job in enumerate(jobs):
        httpx.get(f"{base}/v1/videos/{job}/content", headers=ALICE)
        wait_until(lambda n=n: len(stored_files(base)) == min(n + 1, 2), what="commit")
        if n == 1:  # the first is used again: the second is now the oldest
            assert httpx.get(f"{base}/v1/videos/{jobs[0]}/content", headers=ALICE).headers[
                "x-cache-status"
            ] == "HIT"  # fmt: skip
    total = sum(p.stat().st_size for p in stored_files(base))
    assert total <= 3 * SIZE
    states = [
        httpx.head(f"{base}/v1/videos/{job}/content", headers=ALICE).headers.get("x-cache-status")
        for job in jobs
    ]
    assert states == ["HIT", "BYPASS", "HIT"]
    assert metric(base, "bifrost_proxy_content_evictions_total") == evicted + 1


def test_a_video_larger_than_the_bound_is_relayed_unstored(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(content_max_bytes=SIZE // 2)
    vid = completed(base, upstream)
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert r.status_code == 200 and len(r.content) == SIZE
    assert r.headers["x-cache-status"] == "BYPASS" and stored_files(base) == []


def test_an_unusable_store_relays_and_counts(
    make_proxy: Any, upstream: Upstream, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    # Files where the store's directories should be: every write fails, as on a
    # read-only or full disk, whoever runs the test (root ignores permission bits).
    (root / "spool").write_text("not a directory")
    (root / "objects").write_text("not a directory")
    base = make_proxy(content_dir=str(root))
    vid = completed(base, upstream)

    def errors() -> float:
        return sum(
            metric(base, "bifrost_proxy_content_store_errors_total", f'{{op="{op}"}}')
            for op in ("open", "fill")
        )

    before = errors()
    for _ in range(2):
        r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
        assert r.status_code == 200 and r.content == expected_content(
            vid.rpartition(":")[0], "video", SIZE
        )
        assert r.headers["x-cache-status"] == "BYPASS"
    assert errors() == before + 2


def test_expiry_and_retention(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy()
    vid = completed(base, upstream)
    httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    wait_until(lambda: len(stored_files(base)) == 1, what="commit")
    upstream.clock.advance(3700)  # past the job's expires_at (completed + 3600)
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert r.headers["x-cache-status"] != "HIT"
    # With a retention, the proxy keeps it past the provider's expiry.
    kept = make_proxy(content_retention_seconds=30 * 86400)
    vid = completed(kept, upstream)
    httpx.get(f"{kept}/v1/videos/{vid}/content", headers=ALICE)
    wait_until(lambda: len(stored_files(kept)) == 1, what="commit")
    upstream.clock.advance(5 * 86400)
    r = httpx.get(f"{kept}/v1/videos/{vid}/content", headers=ALICE)
    assert r.headers["x-cache-status"] == "HIT" and len(r.content) == SIZE


def test_prefetch_stores_the_video_when_the_job_is_seen_completed(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy(content_prefetch=True)
    prefetched = metric(base, "bifrost_proxy_content_prefetches_total")
    vid = completed(base, upstream)  # the poll that sees "completed" starts the fill
    wait_until(lambda: len(stored_files(base)) == 1, what="the prefetch")
    assert content_gets(upstream) == 1
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert r.headers["x-cache-status"] == "HIT" and content_gets(upstream) == 1
    assert metric(base, "bifrost_proxy_content_prefetches_total") == prefetched + 1


def test_store_gauges(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy()
    vid = completed(base, upstream)
    httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    wait_until(lambda: len(stored_files(base)) == 1, what="commit")
    assert metric(base, "bifrost_proxy_content_store_objects") == 1
    assert metric(base, "bifrost_proxy_content_store_bytes") >= SIZE


def test_the_openai_sdk_downloads_through_the_store(make_proxy: Any, upstream: Upstream) -> None:
    base = make_proxy()
    client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key="sk-bf-alice", max_retries=0)
    job = client.videos.create(model="openai/sora-2", prompt="a cat")
    upstream.clock.advance(31)
    assert client.videos.retrieve(job.id).status == "completed"
    expected = expected_content(job.id.rpartition(":")[0], "video", SIZE)
    assert client.videos.download_content(job.id).read() == expected
    wait_until(lambda: len(stored_files(base)) == 1, what="commit")
    raw = client.videos.with_raw_response.download_content(job.id).http_response
    assert raw.headers["x-cache-status"] == "HIT" and raw.content == expected
    assert content_gets(upstream) == 1


# -- a stand-in upstream whose transfer the test controls ---------------------------------
class HeldUpstream:
    """Raw sockets: answers a completed job, and its content in two parts: ``first``
    bytes at once, the rest once ``release`` is set (or the connection is cut)."""

    JOB = "video_0123456789abcdef01234567"

    def __init__(self, size: int, first: int, *, cut: bool = False) -> None:
        self.size, self.first, self.cut = size, first, cut
        self.body = bytes(range(256)) * (size // 256)
        self.release = threading.Event()
        self.content_requests: list[bytes] = []
        self.dropped = 0  # transfers the proxy hung up on
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n")[0]
            path = head.split(b" ")[1].partition(b"?")[0]
            if path.endswith(b"/content"):
                self.content_requests.append(head)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % self.size
                )
                conn.sendall(self.body[: self.first])
                self.release.wait(30)
                if not self.cut:
                    try:
                        conn.sendall(self.body[self.first :])
                    except OSError:  # the proxy closed this transfer
                        self.dropped += 1
                return
            job = (
                b'{"id":"%s","object":"video","status":"completed","model":"m",'
                b'"created_at":1,"completed_at":2}' % self.JOB.encode()
            )
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(job), job)
            )

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def held() -> Iterator[Any]:
    made: list[HeldUpstream] = []

    def start(size: int = 8 * 1024 * 1024, first: int = 65536, **kw: Any) -> HeldUpstream:
        made.append(HeldUpstream(size, first, **kw))
        return made[-1]

    yield start
    for up in made:
        up.close()


def seen_completed(base: str, job: str) -> None:
    assert httpx.get(f"{base}/v1/videos/{job}", headers=ALICE).json()["status"] == "completed"


def test_a_players_probe_on_a_cold_object_does_not_wait_for_the_transfer(
    make_proxy: Any, held: Any
) -> None:
    up = held()
    base = make_proxy(upstream_url=up.url)
    job = f"{up.JOB}:runway"
    seen_completed(base, job)
    url = f"{base}/v1/videos/{job}/content"
    # The transfer is held after its first 64 KiB: the probe is answered from them.
    probe = httpx.get(url, headers={**ALICE, "Range": "bytes=0-1"}, timeout=5)
    assert probe.status_code == 206 and probe.content == up.body[:2]
    assert probe.headers["content-range"] == f"bytes 0-1/{up.size}"
    assert probe.headers["x-cache-status"] == "MISS"
    etag = probe.headers["etag"]
    # The prober hung up long ago; the fill goes on, shared by every later download.
    with ThreadPoolExecutor(4) as pool:
        downloads = [pool.submit(httpx.get, url, headers=ALICE, timeout=30) for _ in range(4)]
        seek = pool.submit(
            httpx.get, url, headers={**ALICE, "Range": f"bytes={up.size - 10}-"}, timeout=30
        )
        wait_until(lambda: up.content_requests, what="the fill's request")
        up.release.set()
        for done in downloads:
            r = done.result()
            assert r.status_code == 200 and r.content == up.body and r.headers["etag"] == etag
        assert seek.result().status_code == 206 and seek.result().content == up.body[-10:]
    assert len(up.content_requests) == 1  # N downloads, one upstream GET
    # The fill asked for the whole object, plainly: no Range, no conditionals.
    sent = up.content_requests[0].lower()
    assert b"range:" not in sent and b"if-" not in sent and b"authorization: bearer" in sent
    wait_until(lambda: len(stored_files(base)) == 1, what="commit")
    hit = httpx.get(url, headers={**ALICE, "Range": "bytes=0-1"})
    assert hit.headers["x-cache-status"] == "HIT" and hit.headers["etag"] == etag


def test_a_fill_cut_short_by_the_upstream_leaves_no_object(make_proxy: Any, held: Any) -> None:
    up = held(size=1024 * 1024, first=300_000, cut=True)
    base = make_proxy(upstream_url=up.url)
    job = f"{up.JOB}:runway"
    seen_completed(base, job)
    up.release.set()
    with pytest.raises(httpx.RemoteProtocolError):  # the client sees a truncated body
        httpx.get(f"{base}/v1/videos/{job}/content", headers=ALICE, timeout=10)
    wait_until(lambda: not base.app.content.fills, what="the fill to end")
    assert stored_files(base) == []
    spool = Path(base.app.settings.content_dir) / "spool"
    assert list(spool.iterdir()) == []  # no partial object left behind
    # The next download is another attempt (not a HIT of a partial object).
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{base}/v1/videos/{job}/content", headers=ALICE, timeout=10)
    assert len(up.content_requests) == 2


def test_a_hang_up_stops_a_relay_but_not_a_shared_fill(make_proxy: Any, held: Any) -> None:
    up = held()
    base = make_proxy(upstream_url=up.url)
    job = f"{up.JOB}:runway"
    seen_completed(base, job)
    with httpx.stream("GET", f"{base}/v1/videos/{job}/content", headers=ALICE) as r:
        assert r.headers["x-cache-status"] == "MISS"
        next(r.iter_raw())  # the first bytes, then hang up
    up.release.set()
    wait_until(lambda: len(stored_files(base)) == 1, what="the fill to finish unattended")
    r = httpx.get(f"{base}/v1/videos/{job}/content", headers=ALICE)
    assert r.headers["x-cache-status"] == "HIT" and r.content == up.body
    assert len(up.content_requests) == 1


def test_past_content_max_fills_downloads_are_relayed(make_proxy: Any, held: Any) -> None:
    up = held()
    base = make_proxy(upstream_url=up.url, content_max_fills=1)
    seen_completed(base, f"{up.JOB}:runway")
    url = f"{base}/v1/videos/{up.JOB}:runway/content"
    bypassed = metric(base, "bifrost_proxy_content_requests_total", '{result="bypass"}')
    with httpx.stream("GET", url, headers=ALICE) as r:
        assert r.headers["x-cache-status"] == "MISS"
        with httpx.stream("GET", f"{url}?variant=thumbnail", headers=ALICE) as other:
            assert other.headers["x-cache-status"] == "BYPASS"  # the one fill slot is taken
        assert len(up.content_requests) == 2
    up.release.set()
    wait_until(lambda: len(stored_files(base)) == 1, what="the one fill to finish")
    wait_until(lambda: up.dropped == 1, what="the relay's upstream read to stop at once")
    assert metric(base, "bifrost_proxy_content_requests_total", '{result="bypass"}') == (
        bypassed + 1
    )


# -- S3: SeaweedFS, two replicas on one bucket and one Redis -------------------------------
@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    from tests.s3_server import s3_server

    with s3_server() as server:
        yield server


def bucket_keys(s3: Any, prefix: str) -> list[str]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        s3.bucket, prefix=prefix, endpoint=s3.endpoint, access_key_id="k",
        secret_access_key="s", region="us-east-1", virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )  # fmt: skip
    return [item["path"] for item in obstore.list(store).collect()]


def test_two_replicas_on_one_bucket_share_stored_videos(
    s3: Any, upstream: Upstream, tmp_path: Path
) -> None:
    from tests.redis_server import redis_server
    from tests.servers import run_replicas
    from tests.test_redis_cache import redis_env

    prefix = "replicas"
    with redis_server() as redis:
        env = {**redis_env(redis), **s3.env(prefix)}
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            vid = str(create(a.url)["id"])
            upstream.clock.advance(31)
            seen = httpx.get(f"{a.url}/v1/videos/{vid}", headers=ALICE).json()
            assert seen["status"] == "completed"
            expected = expected_content(vid.rpartition(":")[0], "video", SIZE)
            first = httpx.get(f"{a.url}/v1/videos/{vid}/content", headers=ALICE)
            assert first.content == expected and first.headers["x-cache-status"] == "MISS"
            wait_until(lambda: len(bucket_keys(s3, prefix)) == 1, what="the upload")
            # Replica B never saw this video: it serves it from the bucket.
            url_b = f"{b.url}/openai/v1/videos/{vid}/content"
            hit = httpx.get(url_b, headers=ALICE)
            assert hit.content == expected and hit.headers["x-cache-status"] == "HIT"
            assert hit.headers["etag"] == first.headers["etag"]
            assert hit.headers["content-type"] == "video/mp4"
            sdk = openai.OpenAI(base_url=f"{b.url}/openai/v1", api_key="sk-bf-alice")
            assert sdk.videos.download_content(vid).read() == expected  # the SDK, from S3
            seek = httpx.get(url_b, headers={**ALICE, "Range": "bytes=100-199"})
            assert seek.status_code == 206 and seek.content == expected[100:200]
            assert seek.headers["content-range"] == f"bytes 100-199/{SIZE}"
            assert httpx.get(url_b, headers={**ALICE, "Range": f"bytes={SIZE}-"}).status_code == 416
            assert content_gets(upstream) == 1
            assert httpx.get(url_b, headers=BOB).status_code == 404  # never another tenant's

            # The gauges count the bucket once across both replicas.
            def objects(url: str) -> float:
                return metric(url, "bifrost_proxy_content_store_objects")

            wait_until(lambda: objects(a.url) + objects(b.url) == 1, what="the gauges")
            # A DELETE through B removes the stored object for both.
            assert httpx.delete(f"{b.url}/v1/videos/{vid}", headers=ALICE).status_code == 200
            assert bucket_keys(s3, prefix) == []


def test_s3_down_downloads_are_relayed(make_proxy: Any, upstream: Upstream) -> None:
    from tests.servers import free_port

    base = make_proxy(
        content_cache="s3", content_s3_url="s3://nowhere/videos", cache_key_secret="k",
        content_s3_endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
    )  # fmt: skip
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "k")
    vid = completed(base, upstream)
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE, timeout=30)
    assert r.status_code == 200 and len(r.content) == SIZE
    assert r.headers["x-cache-status"] == "BYPASS"
    assert metric(base, "bifrost_proxy_content_store_errors_total", '{op="open"}') >= 1


def test_a_disk_failing_mid_fill_costs_the_client_nothing(
    make_proxy: Any, held: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.content import objects

    up = held(size=2 * 1024 * 1024, first=65536)
    base = make_proxy(upstream_url=up.url)
    job = f"{up.JOB}:runway"
    seen_completed(base, job)
    real_write, writes = objects.Spool.write, []

    def full_disk(self: objects.Spool, position: int, data: bytes) -> None:
        writes.append(position)
        if len(writes) > 1:  # the first chunk fits, then the disk is full
            raise objects.StoreError("spool write failed: No space left on device")
        real_write(self, position, data)

    monkeypatch.setattr(objects.Spool, "write", full_disk)
    with ThreadPoolExecutor(1) as pool:
        download = pool.submit(httpx.get, f"{base}/v1/videos/{job}/content", headers=ALICE)
        wait_until(lambda: len(writes) == 1, what="the first chunk in the spool")
        up.release.set()
        r = download.result(30)
    # Whole and exact: past the spool's end the rest was fetched again and skipped to.
    assert r.status_code == 200 and r.content == up.body
    assert len(up.content_requests) == 2
    wait_until(lambda: not base.app.content.fills, what="the fill to end")
    assert stored_files(base) == []
    assert list((Path(base.app.settings.content_dir) / "spool").iterdir()) == []


def test_replicas_sharing_a_directory_and_workers_count_the_store_once(
    upstream: Upstream, tmp_path: Path
) -> None:
    from tests.redis_server import redis_server
    from tests.servers import run_proxy, run_replicas
    from tests.test_redis_cache import redis_env

    shared = str(tmp_path / "shared-store")
    with redis_server() as redis:
        env = {**redis_env(redis), "PROXY_CONTENT_DIR": shared}
        with run_replicas(upstream.url, env, tmp_path) as (a, b):
            vid = str(create(a.url)["id"])
            upstream.clock.advance(31)
            assert httpx.get(f"{a.url}/v1/videos/{vid}", headers=ALICE).json()["status"] == (
                "completed"
            )
            first = httpx.get(f"{a.url}/v1/videos/{vid}/content", headers=ALICE)
            assert first.headers["x-cache-status"] == "MISS"

            def found_by_b() -> bool:
                head = httpx.head(f"{b.url}/v1/videos/{vid}/content", headers=ALICE)
                return head.headers.get("x-cache-status") == "HIT"

            wait_until(found_by_b, what="replica B to find the object on the shared disk")
            assert httpx.get(f"{b.url}/v1/videos/{vid}/content", headers=ALICE).content == (
                first.content
            )
            assert content_gets(upstream) == 1
    # Two workers on one directory: the gauges count each object once.
    with run_proxy(
        upstream.url, "--workers", "2", env={"PROXY_CONTENT_DIR": shared}, tmp_path=tmp_path
    ) as proc:
        wait_until(
            lambda: metric(proc.url, "bifrost_proxy_content_store_objects") == 1,
            what="one object counted once",
        )
        assert metric(proc.url, "bifrost_proxy_content_store_bytes") > SIZE


def test_head_during_a_fill_and_of_nothing_stored(make_proxy: Any, held: Any) -> None:
    up = held()
    base = make_proxy(upstream_url=up.url)
    job = f"{up.JOB}:runway"
    seen_completed(base, job)
    url = f"{base}/v1/videos/{job}/content"
    with httpx.stream("GET", url, headers=ALICE) as r:
        assert r.headers["x-cache-status"] == "MISS"
        head = httpx.head(url, headers=ALICE)  # answered from the running fill
        assert head.status_code == 200 and head.headers["x-cache-status"] == "MISS"
        assert head.headers["etag"] == r.headers["etag"]
        assert head.headers["content-length"] == str(up.size)
        up.release.set()
        assert b"".join(r.iter_bytes()) == up.body
    assert len(up.content_requests) == 1


def test_a_stored_object_whose_size_is_off_is_treated_as_missing(
    make_proxy: Any, upstream: Upstream
) -> None:
    base = make_proxy()
    vid = completed(base, upstream)
    expected = expected_content(vid.rpartition(":")[0], "video", SIZE)
    httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    wait_until(lambda: len(stored_files(base)) == 1, what="commit")
    [stored] = stored_files(base)
    os.truncate(stored, stored.stat().st_size - 1000)  # damaged behind the proxy's back
    r = httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE)
    assert r.status_code == 200 and r.content == expected  # never the damaged bytes
    assert r.headers["x-cache-status"] == "MISS" and content_gets(upstream) == 2
    wait_until(
        lambda: len(stored_files(base)) == 1 and stored_files(base)[0].stat().st_size > SIZE,
        what="the refill",
    )
    assert httpx.get(f"{base}/v1/videos/{vid}/content", headers=ALICE).content == expected

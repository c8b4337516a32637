"""The benchmark: one command, everything on loopback, ratios against same-run baselines.

    python -m tests.perf [--quick]

Starts nginx (fixed job bodies: the upstream is never the bottleneck), the proxy
(the real console script, metrics and access logging on), a bare Starlette route and
an aiohttp reference proxy, drives them with wrk (1 thread, 32 connections),
alternating proxy and baselines, and prints each figure as a ratio with its target.
The last results are kept in tests/perf/last_results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from proxy.simulator.app import SimulatorConfig, create_simulator
from tests.servers import free_port, serve_in_thread, wait_until

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).with_name("bifrost-video-proxy")
JOB = {
    "object": "video", "model": "sora-2", "progress": 100.0, "prompt": "a cat on a skateboard " * 8,
    "seconds": "8", "size": "1280x720", "created_at": 1795000000, "completed_at": 1795000060,
    "videos": [{"type": "video", "url": "https://videos.example/v.mp4", "content_type": "video/mp4"}],
    "extra_fields": {"request_type": "video_retrieve", "provider": "openai", "model_requested": "sora-2",
                     "latency": 412},
}  # fmt: skip
DOWNLOAD_BYTES = 256 * 1024 * 1024


def ensure_tools() -> None:
    missing = [
        t for t in ("wrk", "nginx") if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())
    ]
    if missing:
        print(f"installing {missing} from Debian's packages…", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk", "nginx-light"], check=True, env=env
        )


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


@contextlib.contextmanager
def nginx(workdir: Path) -> Iterator[str]:
    port = free_port()
    running = dict(JOB, id="video_bench:openai", status="in_progress", progress=50.0)
    done = dict(
        JOB, id="video_done:openai", status="completed", expires_at=int(time.time()) + 86400
    )
    (workdir / "video.bin").write_bytes(b"")
    os.truncate(workdir / "video.bin", DOWNLOAD_BYTES)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  log_format sent '$request_uri $body_bytes_sent';
  keepalive_requests 1000000;
  client_body_temp_path {workdir};
  proxy_temp_path {workdir};
  fastcgi_temp_path {workdir};
  uwsgi_temp_path {workdir};
  scgi_temp_path {workdir};
  server {{
    listen 127.0.0.1:{port};
    location ~ ^/v1/videos/[^/]+/content$ {{
      default_type video/mp4; alias {workdir}/video.bin;
      access_log {workdir}/content.log sent;
    }}
    location ~ ^/v1/videos/(store_[a-z0-9_]+:openai)$ {{
      default_type application/json; return 200 '{json.dumps(done).replace("video_done:openai", "$1")}';
    }}
    location ~ ^/v1/videos/done {{ default_type application/json; return 200 '{json.dumps(done)}'; }}
    location /v1/videos/ {{ default_type application/json; return 200 '{json.dumps(running)}'; }}
  }}
}}
""")
    proc = subprocess.Popen(
        [nginx_binary(), "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url + "/v1/videos/x:openai"), what="nginx")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def process(
    cmd: list[str], health: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[psutil.Process]:
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "wb")) if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out)
        try:
            wait_until(lambda: _up(health), timeout=20, what=" ".join(cmd[:2]))
            yield psutil.Process(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def proxy_cmd(upstream: str, port: int, *extra: str) -> list[str]:
    return [str(EXE), "--upstream", upstream, "--port", str(port), *extra]


def uvicorn_cmd(app: str, port: int, env: dict[str, str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def wrk(
    url: str,
    seconds: float,
    connections: int = 32,
    script: Path | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    scale = {"us": 1e-3, "ms": 1.0, "s": 1000.0}

    def percentile(name: str) -> float:
        found = re.search(name + r"%\s+([\d.]+)(us|ms|s)", out)
        return float(found.group(1)) * scale[found.group(2)] if found else float("nan")

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": percentile("50"),
        "p99_ms": percentile("99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


DISTINCT_IDS = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/videos/video_" .. counter .. "_" .. math.random(1, 1000000000) .. ":openai")
end
"""
TEN_THOUSAND_DONE = """
counter = 0
responses = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/videos/done_" .. counter .. ":openai")
end
response = function(status, headers, body)
  responses = responses + 1
  if responses >= 10000 then wrk.thread:stop() end
end
"""


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


def rss_mib(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def bench_throughput(
    up: str, work: Path, rounds: int, seconds: float, results: dict[str, Any]
) -> None:
    auth = {"Authorization": "Bearer sk-bf-bench"}
    hit_port, bare_port, ref_port, raw_port = free_port(), free_port(), free_port(), free_port()
    distinct = work / "distinct.lua"
    distinct.write_text(DISTINCT_IDS)
    hit_url = f"http://127.0.0.1:{hit_port}/v1/videos/done_hit:openai"
    with process(
        proxy_cmd(up, hit_port),
        f"http://127.0.0.1:{hit_port}/healthz",
        env={"PROXY_POLL_COALESCE_SECONDS": "0"},
        log=work / "proxy.log",
    ) as proc:
        body = httpx.get(hit_url, headers=auth).content  # MISS: stored
        hit = httpx.get(hit_url, headers=auth)
        assert hit.headers["x-cache-status"] == "HIT", hit.headers
        (work / "hit.json").write_bytes(hit.content)
        env = {
            "BENCH_HIT_BODY": str(work / "hit.json"),
            "BENCH_UPSTREAM": up,
            "PYTHONPATH": str(HERE.parent.parent),
        }

        def cpu_us(run: Any) -> tuple[dict[str, float], float]:
            """wrk's figures, and the proxy's CPU (user + sys) per request in µs."""
            before = sum(proc.cpu_times()[:2])
            out = run()
            used = sum(proc.cpu_times()[:2]) - before
            return out, used / max(out["rps"] * seconds, 1) * 1e6

        with process(uvicorn_cmd("tests.perf.baselines:bare", bare_port, env), f"http://127.0.0.1:{bare_port}/v1/videos/x", env=env), \
             process(uvicorn_cmd("tests.perf.baselines:raw", raw_port, env), f"http://127.0.0.1:{raw_port}/v1/videos/x", env=env), \
             process(uvicorn_cmd("tests.perf.baselines:reference", ref_port, env), f"http://127.0.0.1:{ref_port}/v1/videos/x", env=env):  # fmt: skip
            hits, raws, passes, latency = [], [], [], []
            hit_p99, pass_p99, ref_p99, hit_cpu, miss_cpu = [], [], [], [], []
            for _ in range(rounds):
                bare = wrk(f"http://127.0.0.1:{bare_port}/v1/videos/done_hit:openai", seconds)[
                    "rps"
                ]
                raw = wrk(f"http://127.0.0.1:{raw_port}/v1/videos/done_hit:openai", seconds)["rps"]
                mine, cpu = cpu_us(lambda: wrk(hit_url, seconds, headers=auth))
                hits.append((mine["rps"], bare))
                raws.append((mine["rps"], raw))
                hit_p99.append(mine["p99_ms"])
                hit_cpu.append(cpu)
                ref = wrk(f"http://127.0.0.1:{ref_port}/", seconds, script=distinct)
                through, cpu = cpu_us(
                    lambda: wrk(
                        f"http://127.0.0.1:{hit_port}/", seconds, script=distinct, headers=auth
                    )
                )
                passes.append((through["rps"], ref["rps"]))
                pass_p99.append(through["p99_ms"])
                ref_p99.append(ref["p99_ms"])
                miss_cpu.append(cpu)
                direct = wrk(f"{up}/v1/videos/video_1:openai", seconds / 2, connections=1)["p50_ms"]
                proxied = wrk(
                    f"http://127.0.0.1:{hit_port}/",
                    seconds / 2,
                    connections=1,
                    script=distinct,
                    headers=auth,
                )["p50_ms"]
                latency.append(proxied - direct)
                print(
                    f"  round: hit {mine['rps']:.0f} vs bare {bare:.0f} vs raw {raw:.0f}; pass-through {through['rps']:.0f} vs reference {ref['rps']:.0f}; +{proxied - direct:.3f} ms p50",
                    file=sys.stderr,
                )
    results["hit_vs_bare"] = {"ratio": median_ratio(hits), "target": ">= 1.0", "runs": hits}
    results["hit_vs_raw_asgi"] = {"ratio": median_ratio(raws), "target": ">= 0.9", "runs": raws}
    results["passthrough_vs_reference"] = {
        "ratio": median_ratio(passes),
        "target": ">= 0.8",
        "runs": passes,
    }
    results["added_latency_p50_ms"] = {
        "value": statistics.median(latency),
        "target": "<= 0.44",
        "runs": latency,
    }
    results["hit_p99_ms"] = {"value": statistics.median(hit_p99), "target": "<= 5", "runs": hit_p99}
    results["miss_p99_ms"] = {
        "value": statistics.median(pass_p99),
        "target": f"<= {statistics.median(ref_p99):.0f}",  # the reference's own p99
        "runs": pass_p99,
        "reference": ref_p99,
    }
    results["cpu_us_per_hit"] = {"value": statistics.median(hit_cpu), "target": "-"}
    results["cpu_us_per_miss"] = {"value": statistics.median(miss_cpu), "target": "-"}
    del body


def bench_workers(
    up: str, work: Path, rounds: int, seconds: float, results: dict[str, Any]
) -> None:
    auth = {"Authorization": "Bearer sk-bf-bench"}
    pairs, cores = [], []
    for _ in range(rounds):
        rps = []
        for workers in ("1", "2"):
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1/videos/done_w:openai"
            with process(
                proxy_cmd(up, port, "--workers", workers),
                f"http://127.0.0.1:{port}/healthz",
                log=work / "workers.log",
            ) as proc:
                for _ in range(8):  # store, then memoise in every worker
                    httpx.get(url, headers=auth)
                tree = [proc, *proc.children(recursive=True)]
                used = sum(sum(p.cpu_times()[:2]) for p in tree)
                started = time.perf_counter()
                rps.append(wrk(url, seconds, headers=auth)["rps"])
                used = sum(sum(p.cpu_times()[:2]) for p in tree) - used
                # Cores the proxy used: with 2 workers, what wrk leaves of the machine.
                cores.append(round(used / (time.perf_counter() - started), 2))
        pairs.append((rps[1], rps[0]))
        print(
            f"  round: 1 worker {rps[0]:.0f} req/s on {cores[-2]} cores,"
            f" 2 workers {rps[1]:.0f} on {cores[-1]} (of {os.cpu_count()}, wrk included)",
            file=sys.stderr,
        )
    results["workers2_vs_1"] = {
        "ratio": median_ratio(pairs), "target": ">= 1.3", "runs": pairs,
        "proxy_cores_1_2": cores, "machine_cores": os.cpu_count(),
    }  # fmt: skip


def bench_memory(up: str, work: Path, rounds: int, results: dict[str, Any]) -> None:
    auth = {"Authorization": "Bearer sk-bf-bench"}
    port = free_port()
    tenk, distinct = work / "tenk.lua", work / "distinct.lua"
    tenk.write_text(TEN_THOUSAND_DONE)
    with process(
        proxy_cmd(up, port), f"http://127.0.0.1:{port}/healthz", log=work / "memory.log"
    ) as proc:
        # Warm up with the same request shape (running jobs: nothing is stored), and
        # let the 1 s flush of metrics and access lines run before each reading.
        wrk(f"http://127.0.0.1:{port}/", 3, script=distinct, headers=auth)
        time.sleep(2 * 1.0 + 0.5)
        before = rss_mib(proc)
        wrk(f"http://127.0.0.1:{port}/", 30, script=tenk, headers=auth)  # stops at 10,000
        time.sleep(2 * 1.0 + 0.5)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        entries = float(
            re.search(r"^bifrost_proxy_cache_entries ([\d.e+]+)", metrics, re.M).group(1)
        )  # type: ignore[union-attr]
        after = rss_mib(proc)
    growth = (after - before) * 10000 / max(entries, 1)
    results["rss_per_10k_entries_mib"] = {
        "value": growth,
        "target": "<= 40",
        "entries": entries,
        "rss_mib": [before, after],
    }

    port = free_port()
    url = "/v1/videos/v:openai/content"
    download(up + url, auth)  # warm nginx's page cache
    with process(
        proxy_cmd(up, port), f"http://127.0.0.1:{port}/healthz", log=work / "download.log"
    ) as proc:
        pairs, growth = sampled_downloads(
            proc, up + url, f"http://127.0.0.1:{port}{url}", auth, rounds
        )
    results["download_rss_growth_mib"] = {"value": growth, "target": "<= 32"}
    results["download_speed_vs_direct"] = {
        "ratio": median_ratio(pairs),
        "target": ">= 0.5",
        "seconds": pairs,
    }


RANGES = """
math.randomseed(7)
request = function()
  local a = math.random(0, %d - 65536)
  return wrk.format("GET", "%s", {["Range"] = "bytes=" .. a .. "-" .. (a + 65535)})
end
"""


def bench_content_store(
    up: str, work: Path, rounds: int, seconds: float, results: dict[str, Any]
) -> None:
    """The content store: HIT speed, memory, shared fills, the cold probe, ranges."""
    auth = {"Authorization": "Bearer sk-bf-bench"}
    port, files_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"PROXY_CONTENT_DIR": str(work / "store"), "PROXY_CONTENT_MAX_BYTES": str(2 << 30)}
    with process(proxy_cmd(up, port), f"{base}/healthz", env=env, log=work / "store.log") as proc:

        def seen(job: str) -> str:
            assert (
                httpx.get(f"{base}/v1/videos/{job}", headers=auth).json()["status"] == "completed"
            )
            return f"/v1/videos/{job}/content"

        def stored(path: str) -> None:
            wait_until(
                lambda: (
                    httpx.head(base + path, headers=auth).headers.get("x-cache-status") == "HIT"
                ),
                timeout=60,
                what="the video to be stored",
            )

        # The cold probe: a player's bytes=0-1 while the first transfer has just begun.
        probes = []
        for n in range(max(rounds, 3)):
            path = seen(f"store_probe{n}:openai")
            direct = ttfb(up + path, {**auth, "Range": "bytes=0-1"})
            proxied = ttfb(base + path, {**auth, "Range": "bytes=0-1"})
            probes.append((proxied - direct) * 1000)
            stored(path)
        results["store_cold_probe_ttfb_ms"] = {
            "value": statistics.median(probes), "target": "<= 50", "runs": probes,
        }  # fmt: skip
        # Ten concurrent downloads of a cold video: the upstream sends it once.
        path = seen("store_ten:openai")
        with ThreadPoolExecutor(10) as pool:
            sizes = list(pool.map(lambda _: download(base + path, auth), range(10)))
        assert len(sizes) == 10
        sent = sum(
            int(line.split()[1])
            for line in (work / "content.log").read_text().splitlines()
            if line.startswith(path)
        )
        results["store_upstream_bytes_for_10"] = {
            "value": sent / DOWNLOAD_BYTES, "target": "<= 1", "bytes": sent,
        }  # fmt: skip
        # HIT speed against a direct download from the upstream, memory sampled.
        stored(path)
        download(base + path, auth)  # warm the page cache of the stored object
        pairs, growth = sampled_downloads(proc, up + path, base + path, auth, rounds)
        results["store_hit_speed_vs_direct"] = {
            "ratio": median_ratio(pairs), "target": ">= 1.0", "seconds": pairs,
        }  # fmt: skip
        results["store_hit_rss_growth_mib"] = {"value": growth, "target": "<= 32"}
        # 100 concurrent range reads: the store against Starlette's FileResponse.
        script = work / "ranges.lua"
        script.write_text(RANGES % (DOWNLOAD_BYTES, path))
        files_env = {"BENCH_FILE": str(work / "video.bin"), "PYTHONPATH": str(HERE.parent.parent)}
        ranges = []
        with process(
            uvicorn_cmd("tests.perf.baselines:files", files_port, files_env),
            f"http://127.0.0.1:{files_port}/v1/videos/x/content",
            env=files_env,
        ):
            for _ in range(rounds):
                bare = wrk(f"http://127.0.0.1:{files_port}/", seconds, 100, script)["rps"]
                mine = wrk(f"{base}/", seconds, 100, script, headers=auth)
                assert mine["non2xx"] == 0, mine
                ranges.append((mine["rps"], bare))
                print(
                    f"  round: ranges {mine['rps']:.0f} vs FileResponse {bare:.0f}", file=sys.stderr
                )
        results["store_ranges_vs_fileresponse"] = {
            "ratio": median_ratio(ranges), "target": ">= 1.0", "runs": ranges,
        }  # fmt: skip


def sampled_downloads(
    proc: psutil.Process, direct_url: str, proxy_url: str, auth: dict[str, str], rounds: int
) -> tuple[list[tuple[float, float]], float]:
    """Alternated (direct, through the proxy) download times, and the proxy's peak RSS
    growth meanwhile (sampled every 50 ms)."""
    peak = [rss_mib(proc)]
    before = peak[0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_mib(proc))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    pairs = []
    for _ in range(max(rounds, 3)):
        direct = download(direct_url, auth)
        through = download(proxy_url, auth)
        pairs.append((direct, through))
    stop.set()
    sampler.join()
    return pairs, max(peak) - before


def ttfb(url: str, headers: dict[str, str]) -> float:
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_starttransfer}",
         *[part for k, v in headers.items() for part in ("-H", f"{k}: {v}")], url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout)


def download(url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            *[part for k, v in headers.items() for part in ("-H", f"{k}: {v}")],
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) == DOWNLOAD_BYTES, out.stdout
    return time.perf_counter() - started


def bench_polls(results: dict[str, Any], jobs: int = 20, pollers: int = 10) -> None:
    config = SimulatorConfig(queued_seconds=1.0, in_progress_seconds=2.0)
    sim_app = create_simulator(config)
    sim = sim_app.state.simulator
    with serve_in_thread(sim_app, lifespan="off") as upstream:
        port = free_port()
        with process(
            proxy_cmd(upstream.url, port, "--log-level", "warning"),
            f"http://127.0.0.1:{port}/healthz",
        ):
            base = f"http://127.0.0.1:{port}"

            async def run() -> int:
                # aiohttp as the client: httpx's default transport could not keep 200
                # pollers at 10 polls/s, which would understate the ratio.
                polls = 0
                auth = {"Authorization": "Bearer sk-bf-bench"}
                connector = aiohttp.TCPConnector(limit=300)
                async with aiohttp.ClientSession(base, connector=connector) as client:

                    async def poll(vid: str) -> str:
                        nonlocal polls
                        async with client.get(f"/v1/videos/{vid}", headers=auth) as r:
                            polls += 1
                            return str((await r.json())["status"])

                    async def poller(vid: str) -> None:
                        tick = time.monotonic()
                        while await poll(vid) not in ("completed", "failed"):
                            tick += 0.1  # every 100 ms, whatever the answer's latency
                            await asyncio.sleep(max(0.0, tick - time.monotonic()))
                        for _ in range(10):
                            tick += 0.1
                            await asyncio.sleep(max(0.0, tick - time.monotonic()))
                            await poll(vid)

                    ids = []
                    for i in range(jobs):
                        body = {"model": "openai/sora-2", "prompt": f"job {i}"}
                        async with client.post("/v1/videos", json=body, headers=auth) as r:
                            ids.append((await r.json())["id"])
                    sim.state.reset()
                    await asyncio.gather(*(poller(v) for v in ids for _ in range(pollers)))
                return polls

            polls = asyncio.run(run())
            upstream_retrieves = sim.state.calls["GET"]
    results["polls_per_upstream_retrieve"] = {
        "ratio": polls / max(upstream_retrieves, 1),
        "target": ">= 50",
        "polls": polls,
        "upstream": upstream_retrieves,
    }


def verdict(figure: dict[str, Any]) -> str:
    value = figure.get("ratio", figure.get("value"))
    if figure["target"] == "-":
        return "-"
    op, limit = figure["target"].split()
    ok = value >= float(limit) if op == ">=" else value <= float(limit)
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.perf")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, seconds = (1, 3.0) if args.quick else (3, 5.0)
    ensure_tools()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bvp-bench-") as tmp:
        work = Path(tmp)
        os.environ["PROXY_CONTENT_DIR"] = str(work / "content")  # never ~/.cache
        with nginx(work) as up:
            print("throughput (wrk -t1 -c32), alternating proxy and baselines…", file=sys.stderr)
            bench_throughput(up, work, rounds, seconds, results)
            print("workers…", file=sys.stderr)
            bench_workers(up, work, rounds, seconds, results)
            print("memory and downloads…", file=sys.stderr)
            bench_memory(up, work, rounds, results)
            print("content store (256 MiB video)…", file=sys.stderr)
            bench_content_store(up, work, rounds, seconds, results)
        print("polls (simulator, 20 jobs x 10 pollers)…", file=sys.stderr)
        bench_polls(results)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    print(f"\nbifrost-video-proxy benchmark ({machine}; {rounds} rounds x {seconds:.0f} s)\n")
    print(f"| {'figure':<48} | {'result':>9} | {'target':>7} | verdict |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 9}|---------|")
    names = {
        "hit_vs_bare": "cache HIT req/s ÷ bare Starlette req/s",
        "hit_vs_raw_asgi": "cache HIT req/s ÷ raw ASGI callable req/s",
        "hit_p99_ms": "HIT p99 at 32 connections, logging on (ms)",
        "miss_p99_ms": "miss p99 at 32 connections (ms)",
        "cpu_us_per_hit": "proxy CPU per HIT (µs)",
        "cpu_us_per_miss": "proxy CPU per miss (µs)",
        "passthrough_vs_reference": "pass-through req/s ÷ aiohttp reference proxy",
        "added_latency_p50_ms": "added p50 latency at 1 connection (ms)",
        "polls_per_upstream_retrieve": "client polls ÷ upstream retrieves",
        "rss_per_10k_entries_mib": "RSS growth per 10,000 cached entries (MiB)",
        "download_rss_growth_mib": "256 MiB download: RSS growth (MiB)",
        "download_speed_vs_direct": "256 MiB download speed ÷ direct",
        "workers2_vs_1": "--workers 2 HIT req/s ÷ 1 worker",
        "store_hit_speed_vs_direct": "stored 256 MiB: HIT download speed ÷ direct",
        "store_hit_rss_growth_mib": "stored 256 MiB: RSS growth during HITs (MiB)",
        "store_upstream_bytes_for_10": "10 concurrent downloads: upstream bytes ÷ size",
        "store_cold_probe_ttfb_ms": "cold bytes=0-1: TTFB after upstream's (ms)",
        "store_ranges_vs_fileresponse": "100 conc. range reads ÷ Starlette FileResponse",
    }
    for key, label in names.items():
        figure = results[key]
        value = figure.get("ratio", figure.get("value"))
        print(f"| {label:<48} | {value:>9.2f} | {figure['target']:>7} | {verdict(figure):<7} |")
    results["machine"] = machine
    results["rounds"], results["seconds"] = rounds, seconds
    (HERE / "last_results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real servers on loopback ports for the tests: uvicorn threads and subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
import uvicorn.server

# uvicorn polls: its exit flag every 0.1 s, draining connections and tasks every 0.1 s,
# and it waits 0.1 s more after asking connections to close. In-thread test servers
# (two or more per test) spent ~0.3 s each stopping: ~2.5 minutes of the suite. Here
# the same steps, in the same order, poll every 5 ms. Subprocesses (the console
# script) keep uvicorn's own timing.
POLL_SECONDS = 0.005


class _PromptAsyncio:
    """``asyncio`` as uvicorn's server module sees it, with sleeps capped at a poll."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(min(delay, POLL_SECONDS), result)


uvicorn.server.asyncio = _PromptAsyncio()  # type: ignore[assignment]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll until predicate() is true; the tests' only way of waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@dataclass
class ThreadServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextlib.contextmanager
def serve_in_thread(app: Any, *, lifespan: str = "on", **config: Any) -> Iterator[ThreadServer]:
    """uvicorn in a thread on a free loopback port; ``config``: more uvicorn.Config."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan=lifespan,
        timeout_graceful_shutdown=1,
        proxy_headers=False,
        **config,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="server start")
    try:
        yield ThreadServer(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class ProxyProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def run_proxy(
    upstream: str, *extra: str, env: dict[str, str] | None = None, tmp_path: Any = None
) -> Iterator[ProxyProcess]:
    """The real console script, on a free port, until the block ends."""
    port = free_port()
    log_path = os.path.join(str(tmp_path or "/tmp"), f"proxy-{port}.log")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    full_env.update(env or {})
    # A content store of its own (never the user's ~/.cache), unless the test shares one.
    full_env.setdefault("PROXY_CONTENT_DIR", tempfile.mkdtemp(prefix="bvp-content-"))
    exe = os.path.join(os.path.dirname(sys.executable), "bifrost-video-proxy")
    cmd = [exe, "--upstream", upstream, "--port", str(port), *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            with open(log_path) as f:
                raise AssertionError(f"proxy exited early:\n{f.read()}")
        try:
            return httpx.get(url + "/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=20, what="proxy start")
        yield ProxyProcess(url, port, process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def run_replicas(
    upstream: str, env: dict[str, str], tmp_path: Any
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two console-script replicas with the same environment (e.g. one Redis)."""
    with (
        run_proxy(upstream, env=env, tmp_path=tmp_path) as a,
        run_proxy(upstream, env=env, tmp_path=tmp_path) as b,
    ):
        yield a, b

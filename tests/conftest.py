from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.app import create_app
from proxy.protocol import GuardedHttpToolsProtocol
from proxy.services import Services
from proxy.settings import Settings, load
from proxy.simulator.app import Simulator, SimulatorConfig, create_simulator
from tests.servers import ProxyProcess, run_proxy, serve_in_thread


class FakeClock:
    """A clock the test moves by hand (starts at the real time, then stands still)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Upstream:
    url: str
    sim: Simulator
    clock: FakeClock

    @property
    def calls(self) -> int:
        return self.sim.state.total


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream(clock: FakeClock) -> Iterator[Upstream]:
    """The simulator on a real loopback port, with a test-controlled clock."""
    app = create_simulator(SimulatorConfig(queued_seconds=10, in_progress_seconds=20, clock=clock))
    with serve_in_thread(app, lifespan="off") as server:
        yield Upstream(server.url, app.state.simulator, clock)


@pytest.fixture
def proxy_process(upstream: Upstream, tmp_path: Any) -> Iterator[ProxyProcess]:
    """The real console script in front of the simulator."""
    with run_proxy(upstream.url, tmp_path=tmp_path) as proc:
        yield proc


def make_settings(upstream_url: str, **overrides: Any) -> Settings:
    # Each proxy a content store of its own (never the user's ~/.cache).
    overrides.setdefault("content_dir", tempfile.mkdtemp(prefix="bvp-content-"))
    return load(env={}, overrides={"upstream_url": upstream_url, **overrides})


class ProxyURL(str):
    """The proxy's base URL, carrying its services for white-box assertions."""

    app: Services


@pytest.fixture
def make_proxy(upstream: Upstream) -> Iterator[Any]:
    """Start an in-thread proxy (uvicorn, real socket) with given settings.

    It shares the simulator's clock, so expiry is tested by moving the clock.
    """
    stack: list[Any] = []

    def start(**overrides: Any) -> ProxyURL:
        settings = make_settings(overrides.pop("upstream_url", upstream.url), **overrides)
        app = create_app(settings, clock=upstream.clock)
        # The protocol and WebSocket setting the console script runs with.
        cm = serve_in_thread(app, http=GuardedHttpToolsProtocol, ws="none")
        server = cm.__enter__()
        stack.append(cm)
        url = ProxyURL(server.url)
        url.app = app.state.services
        return url

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def proxy(make_proxy: Any) -> ProxyURL:
    return make_proxy()  # type: ignore[no-any-return]

"""Command line and process wiring: settings → logging → uvicorn (→ simulator)."""

from __future__ import annotations

import argparse
import atexit
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn
from prometheus_client import start_http_server
from starlette.applications import Starlette

from . import __version__, logs, metrics
from .app import create_app
from .protocol import GuardedHttpToolsProtocol
from .settings import HELP, Settings, SettingsError, load

log = logging.getLogger("proxy")
SIMULATOR_THREAD = "bifrost-simulator"
# CLI flag → setting name. Every flag is also settable as PROXY_<NAME>.
FLAGS = {
    "upstream": "upstream_url",
    "host": "host",
    "port": "port",
    "workers": "workers",
    "log_level": "log_level",
    "log_format": "log_format",
    "metrics_port": "metrics_port",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bifrost-video-proxy",
        description="A caching, validating proxy in front of Bifrost's video API.",
    )
    p.add_argument("--upstream", metavar="URL", help=HELP["upstream_url"])
    p.add_argument("--host", metavar="H", help=HELP["host"])
    p.add_argument("--port", metavar="P", help=HELP["port"])
    p.add_argument("--workers", metavar="N", help=HELP["workers"])
    p.add_argument("--config", metavar="FILE", help="TOML settings file (or PROXY_CONFIG).")
    p.add_argument("--log-level", metavar="L", help=HELP["log_level"])
    p.add_argument("--log-format", metavar="F", help=HELP["log_format"])
    p.add_argument("--metrics-port", metavar="P", help=HELP["metrics_port"])
    p.add_argument(
        "--simulate",
        action="store_true",
        help="Start the built-in Bifrost simulator on a loopback port and use it as upstream.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def worker_app() -> Starlette:
    """uvicorn factory: each worker builds its app from the environment, with the
    process-wide parts (logging, the protocol's limits) set up first."""
    settings = load()
    logs.configure(settings.log_level, settings.log_format)
    GuardedHttpToolsProtocol.header_timeout = settings.client_header_timeout_seconds
    GuardedHttpToolsProtocol.max_header_bytes = settings.max_header_bytes
    return create_app(settings)


def start_simulator() -> str:
    """Run the simulator in a daemon thread on a free loopback port; return its URL."""
    from .simulator import create_simulator

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_simulator(), log_config=None, log_level=None, lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn's servers share one logger: the proxy's own startup lines are enough.
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: record.threadName != SIMULATOR_THREAD or record.levelno >= logging.WARNING
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=SIMULATOR_THREAD
    )
    thread.start()
    return f"http://127.0.0.1:{port}"


def enable_multiprocess_metrics() -> None:
    """Workers write metrics to a fresh directory; any scrape sums them all."""
    directory = tempfile.mkdtemp(prefix="bifrost-video-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, Any] = {
        setting: getattr(args, flag) for flag, setting in FLAGS.items() if getattr(args, flag)
    }
    try:
        settings: Settings = load(config_file=args.config, overrides=overrides)
    except SettingsError as exc:
        print(f"bifrost-video-proxy: invalid setting: {exc}", file=sys.stderr)
        return 2
    # Workers (separate processes) rebuild settings from the environment.
    if args.config:
        os.environ["PROXY_CONFIG"] = args.config
    for name, value in overrides.items():
        os.environ[f"PROXY_{name.upper()}"] = str(value)
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        enable_multiprocess_metrics()
        if not settings.cache_key_secret:
            # One per start, shared by this host's workers: tenant fingerprints (owners,
            # idempotency scopes) must agree between them.
            os.environ["PROXY_CACHE_KEY_SECRET"] = secrets.token_hex(32)
    if settings.metrics_port:
        # In the supervising process: one listener whatever the worker count, and
        # never the admin routes.
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry())
    if args.simulate:
        url = start_simulator()
        os.environ["PROXY_UPSTREAM_URL"] = url
        log.info("simulator (Bifrost stand-in) on %s", url)
    log.info(
        "bifrost-video-proxy %s: listening on http://%s:%s",
        __version__, settings.host, settings.port,
    )  # fmt: skip
    # uvicorn drains on SIGTERM, then re-raises the signal once the original handler
    # is back: make that handler a no-op so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        "proxy.server:worker_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        # uvicorn's own lines (startup, errors) go through the proxy's formatter.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        server_header=False,
        http=GuardedHttpToolsProtocol,
        # WebSockets are not part of the API; uvicorn's WebSocket layer would also log
        # every handshake header (credentials included) at debug level.
        ws="none",
        timeout_keep_alive=math.ceil(settings.keepalive_timeout_seconds),
        proxy_headers=False,  # the app appends the real peer to X-Forwarded-For itself
        date_header=False,
    )
    return 0

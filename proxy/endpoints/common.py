"""What endpoints share: services, Exchange, Route, and a client hang-up watch."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Receive

from ..exchange import Exchange, exchange_of, refuse_body
from ..forwarder import video_id
from ..ids import VideoId
from ..routes import ROUTE, Route
from ..services import Services


def context(request: Request) -> tuple[Services, Exchange, Route]:
    return request.app.state.services, exchange_of(request), request.scope[ROUTE]


def addressed(
    request: Request, *, body_allowed: bool = False
) -> tuple[Services, Exchange, Route, VideoId]:
    """The context of a request on one video, its id validated (400 before any call)."""
    services, ex, route = context(request)
    if not body_allowed:
        refuse_body(ex)
    video = video_id(services, request.path_params["video_id"])
    ex.provider = video.provider
    return services, ex, route, video


async def client_gone(receive: Receive) -> None:
    """Return once the client has disconnected (its request body, if any, is ignored)."""
    while (await receive())["type"] != "http.disconnect":
        pass

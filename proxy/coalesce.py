"""Single flight: concurrent identical requests share one upstream call.

The shared call runs as its own task, so a waiter whose client hangs up (and whose
handler is cancelled) never cancels it for the others. Its outcome, answer or
error, reaches every waiter; nothing is remembered after it finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The call's result, and whether this caller joined someone else's call."""
        future = self._calls.get(key)
        joined = future is not None
        if future is None:
            future = asyncio.ensure_future(call())
            self._calls[key] = future
            future.add_done_callback(lambda _f: self._forget(key, _f))
        return await asyncio.shield(future), joined

    def _forget(self, key: str, future: asyncio.Future[T]) -> None:
        if self._calls.get(key) is future:
            del self._calls[key]
        if not future.cancelled():
            future.exception()  # mark retrieved: no "never retrieved" warnings

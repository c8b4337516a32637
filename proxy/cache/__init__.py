"""Cache stores behind one small interface: memory (default) and Redis."""

from __future__ import annotations

from collections.abc import Callable

from ..settings import Settings
from .base import CacheStore, Entry
from .memory import MemoryStore

__all__ = ["CacheStore", "Entry", "MemoryStore", "create_store"]


def create_store(
    settings: Settings,
    clock: Callable[[], float],
    on_error: Callable[[str], None] | None = None,
    on_evict: Callable[[], None] = lambda: None,
) -> CacheStore:
    if settings.cache_backend == "redis":
        from .redis import RedisStore

        return RedisStore(settings.redis_url, settings.redis_timeout_seconds, clock, on_error)
    return MemoryStore(
        settings.cache_max_bytes,
        clock,
        on_evict,
        idempotency_max_bytes=settings.idempotency_max_bytes,
        ownership_max_bytes=settings.ownership_max_bytes,
        tenant_share=settings.idempotency_tenant_share,
    )

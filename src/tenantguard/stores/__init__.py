"""Counter stores: where rate-limit state lives. One interface, ``CounterStore``;
``open_counters`` picks the implementation from a URL."""

from typing import Any

from tenantguard.stores._base import CounterSpec, CounterStore
from tenantguard.stores.memory import MemoryCounters

__all__ = ["CounterSpec", "CounterStore", "MemoryCounters", "open_counters"]


def open_counters(url: str, **options: Any) -> CounterStore:
    """``memory`` (the default), or a Redis URL (see ``stores.redis_store``)."""
    if url in ("memory", "memory://"):
        return MemoryCounters()
    from tenantguard.stores.redis_store import RedisCounters  # noqa: PLC0415 - optional weight

    return RedisCounters.from_url(url, **options)

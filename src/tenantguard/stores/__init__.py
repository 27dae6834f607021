"""Counter stores: where rate-limit state lives (memory now; Redis behind the same interface)."""

from tenantguard.stores._base import CounterSpec, CounterStore
from tenantguard.stores.memory import MemoryCounters

__all__ = ["CounterSpec", "CounterStore", "MemoryCounters"]

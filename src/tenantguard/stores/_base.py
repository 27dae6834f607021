"""The one narrow interface every counter store implements.

A check hands the store all its counter operations at once; the store applies them
atomically (every one is consumed or none is) and answers with one ``Outcome`` each.
That single operation is what lets the Redis store turn a decision into one script
call, and what keeps multi-rule checks exact under concurrency.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import NamedTuple, Protocol

from tenantguard.algorithms import Outcome

__all__ = ["CounterSpec", "CounterStore"]


class CounterSpec(NamedTuple):
    """How to count against one rule for one plan; built once and reused per request.

    ``table`` names the counters (``rule|algorithm|window``), so they survive a policy
    reload that keeps all three. ``window`` is the lease time-to-live for concurrency.
    ``enforce`` is false for shadow rules: their denial is reported but blocks nothing.
    ``scoped`` says the rule's key includes the tenant, so a distributed store may keep
    it beside the tenant's other counters (one Redis Cluster slot per tenant).
    """

    table: str
    algorithm: str
    window: float
    limit: int
    burst: int
    enforce: bool
    scoped: bool = True


class CounterStore(Protocol):
    def apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
        tenant: str = "",
    ) -> Awaitable[list[Outcome]]:
        """All-or-nothing: if any enforced spec denies, nothing is consumed.

        ``keys[i]`` is the counter key for ``specs[i]``; ``lease`` identifies the lease
        that concurrency specs record; ``tenant`` is whom the decision is for. An
        ``async def`` fits; a store may also hand back a future of its own.
        """
        ...

    async def release(self, table: str, key: str, lease: str, now: float, tenant: str = "") -> None:
        """End a concurrency lease; unknown or expired leases are ignored."""
        ...

    async def close(self) -> None: ...

"""Calendar periods for usage quotas, and the event buffer's promises."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from tenantguard import EventRecord
from tenantguard._periods import current_period
from tenantguard.events import EventSink
from tenantguard.ledger import MemoryLedger


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "now", "key", "ends"),
    [
        ("day", at(2026, 11, 22, 23, 59, 59), "2026-11-22", at(2026, 11, 23)),
        ("week", at(2026, 11, 22, 12), "2026-W47", at(2026, 11, 23)),  # a Sunday
        ("week", at(2026, 11, 23), "2026-W48", at(2026, 11, 30)),  # Monday starts a week
        ("week", at(2027, 1, 1), "2026-W53", at(2027, 1, 4)),  # ISO year of the week
        ("month", at(2026, 12, 31, 23), "2026-12", at(2027, 1, 1)),
        ("month", at(2028, 2, 29), "2028-02", at(2028, 3, 1)),
        ("year", at(2026, 6, 1), "2026", at(2027, 1, 1)),
        (None, at(2026, 6, 1), "", None),
    ],
)
def test_current_period(period: str | None, now: float, key: str, ends: float | None) -> None:
    assert current_period(period, now) == (key, ends)


def test_unknown_period() -> None:
    with pytest.raises(ValueError, match="unknown period"):
        current_period("fortnight", 0.0)


async def test_full_buffer_drops_and_counts_without_blocking() -> None:
    ledger = MemoryLedger()
    sink = EventSink(ledger, lambda: 1000.0, retention=3600, capacity=3)
    before = REGISTRY.get_sample_value("tenantguard_events_dropped_total") or 0.0
    for index in range(5):
        sink.emit(EventRecord("acme", "warning", f"rule-{index}", 1000.0))
    assert sink.dropped == 2
    assert (REGISTRY.get_sample_value("tenantguard_events_dropped_total") or 0.0) == before + 2
    await sink.close()
    assert sorted(event.name for event in await ledger.events("acme")) == [
        "rule-0", "rule-1", "rule-2",
    ]  # fmt: skip


async def test_events_past_retention_are_purged() -> None:
    ledger = MemoryLedger()
    clock = [1000.0]
    sink = EventSink(ledger, lambda: clock[0], retention=3600, capacity=100)
    await ledger.add_events([EventRecord("acme", "warning", "old", 10.0)])
    sink.emit(EventRecord("acme", "warning", "new", 1000.0))
    clock[0] = 3700.0  # "old" is now past the hour's retention, "new" is not
    await sink.close()
    assert [event.name for event in await ledger.events("acme")] == ["new"]

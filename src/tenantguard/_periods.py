"""UTC calendar periods for usage quotas: which period an instant falls in, and when
it ends. Keys are stable text, so a ledger row is found again by any replica."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["current_period"]


def current_period(period: str | None, now: float) -> tuple[str, float | None]:
    """``(key, ends_at)`` of the period containing ``now``; ``("", None)`` for none.

    Weeks are ISO weeks (Monday to Sunday), keyed ``2026-W47``.
    """
    if period is None:
        return "", None
    at = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + timedelta(days=1)).timestamp()
    if period == "week":
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}", (start + timedelta(days=7)).timestamp()
    if period == "month":
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else (start.replace(month=start.month + 1))
        )
        return start.strftime("%Y-%m"), following.timestamp()
    if period == "year":
        start = at.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        return f"{start.year}", start.replace(year=start.year + 1).timestamp()
    raise ValueError(f"unknown period {period!r}; expected day, week, month or year")

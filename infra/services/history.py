"""Time travel over the archive: `state_at` for Python users, the HTTP API and the CLI."""

from __future__ import annotations

from datetime import datetime, timedelta

from actors.history import RELEVANT_TENANT_TYPES, PointInTime, point_in_time
from events import decode
from infra.adapters.clickhouse.reads import EventFilter
from infra.adapters.clickhouse.store import AsyncStore

TENANT_LOOKBACK = timedelta(days=1)
"""How far before the moment the tenant's limiter and breaker events are read: the limiter's
longest window is a day, and a breaker left open longer has long been probed again."""


class UnknownContext(LookupError):
    """The context had no events at that moment (a 404)."""


async def state_at(store: AsyncStore, tenant_id: str, context_id: str, at: datetime) -> PointInTime:
    """The context, and the limiter and router state that applied to it, as they were at
    `at` (UTC), from the archived events alone."""
    records = await store.stream_events(tenant_id, context_id)
    decoded = (decode(r.body.encode()) for r in records)
    context_events = [e for e in decoded if e.occurred_at <= at]
    if not context_events:
        raise UnknownContext(f"context {context_id!r} had no events at {at.isoformat()}")
    where = EventFilter(
        tenant_id=tenant_id,
        types=tuple(sorted(RELEVANT_TENANT_TYPES)),
        since=at - TENANT_LOOKBACK,
        until=at + timedelta(microseconds=1),
    )
    tenant_events = [decode(r.body.encode()) async for page in store.search(where) for r in page]
    return point_in_time(context_id, at, context_events, tenant_events)

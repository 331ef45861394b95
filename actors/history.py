"""Time travel: a context, and the limiter and router state that applied to it, exactly as
they were at a moment, from events alone (pure; the events come from the log or the archive).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from actors.context import ContextState, ContextView, fold, view
from actors.ports import ChatMessage
from events import CircuitChanged, Envelope, RateAdjusted, RateLimitChecked, RouteDecided

RELEVANT_TENANT_TYPES = frozenset({"RateLimitChecked", "RateAdjusted", "CircuitChanged"})
"""The tenant-wide events (besides the context's own) that a point in time needs."""


class LimiterAt(msgspec.Struct, frozen=True, kw_only=True):
    last_decision: RateLimitChecked | None
    """The user's last rate-limit decision at or before the moment."""
    decisions_last_hour: int
    denials_last_hour: int
    rate_factor: float
    """The adaptive factor in force (1.0: full rate)."""


class RouterAt(msgspec.Struct, frozen=True, kw_only=True):
    sticky_model: str
    """The model the conversation stays on (empty before its first reply)."""
    last_route: RouteDecided | None
    circuits: dict[str, str]
    """Deployment -> breaker state, for every deployment whose breaker had changed by then."""


class PointInTime(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    context: ContextView
    messages: tuple[ChatMessage, ...]
    limiter: LimiterAt
    router: RouterAt
    events: int
    """How many of the context's events the moment includes."""


def point_in_time(
    context_id: str,
    at: datetime,
    context_events: Iterable[Envelope[Any]],
    tenant_events: Iterable[Envelope[Any]],
    user_id: str = "",
) -> PointInTime:
    """Fold the context's events up to `at` (inclusive), and the tenant's limiter and breaker
    events up to `at`, into what held at that moment. Event order: stream version for the
    context, time for the tenant's events; events after `at` are ignored."""
    mine = sorted(
        (e for e in context_events if e.occurred_at <= at), key=lambda e: e.stream_version
    )
    state = fold(ContextState(context_id=context_id), mine)
    owner = user_id or state.owner_id
    last_decision: RateLimitChecked | None = None
    factor = 1.0
    hour = at.timestamp() - 3600
    decisions = denials = 0
    circuits: dict[str, str] = {}
    last_route: RouteDecided | None = None
    for event in sorted(tenant_events, key=lambda e: (e.occurred_at, e.event_id)):
        if event.occurred_at > at:
            break
        p = event.payload
        if isinstance(p, RateLimitChecked) and (not owner or event.user_id == owner):
            last_decision = p
            factor = p.rate_factor
            if event.occurred_at.timestamp() >= hour:
                decisions += 1
                denials += 0 if p.allowed else 1
        elif isinstance(p, RateAdjusted):
            factor = p.factor
        elif isinstance(p, CircuitChanged):
            circuits[p.deployment] = p.to_state.lower()
    for event in reversed(mine):
        if isinstance(event.payload, RouteDecided):
            last_route = event.payload
            break
    return PointInTime(
        at=at,
        context=view(state),
        messages=state.messages,
        limiter=LimiterAt(
            last_decision=last_decision,
            decisions_last_hour=decisions,
            denials_last_hour=denials,
            rate_factor=factor,
        ),
        router=RouterAt(
            sticky_model=state.model, last_route=last_route, circuits=dict(sorted(circuits.items()))
        ),
        events=len(mine),
    )

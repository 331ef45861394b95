"""An event that is a stream of its own: operator actions and the processors' findings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from events.envelope import Envelope
from events.types import CURRENT_SCHEMA, Event


def standalone(
    payload: Event,
    *,
    event_id: str,
    tenant_id: str,
    user_id: str,
    occurred_at: datetime,
    stream: str,
) -> Envelope[Any]:
    """`payload` as the only event of stream `<stream>:<event_id>`: one writer, version 1,
    nothing to conflict with (no lease needed, the chain starts and ends with it)."""
    hex_id = event_id.replace("-", "")
    return Envelope(
        event_id=event_id,
        type=type(payload).__name__,
        schema=CURRENT_SCHEMA[type(payload)],
        occurred_at=occurred_at,
        stream_id=f"{stream}:{event_id}",
        stream_version=1,
        tenant_id=tenant_id,
        user_id=user_id,
        trace_id=hex_id,
        span_id=hex_id[:16],
        correlation_id=event_id,
        payload=payload,
    )

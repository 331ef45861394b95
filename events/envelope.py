"""The envelope every event shares (README.md, "Events"; docs/events.schema.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, TypeVar

import msgspec

P = TypeVar("P")

UUID7 = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        description="UUIDv7, lower-case; the idempotency key everywhere downstream",
    ),
]
TraceId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$", description="W3C trace-id")]
SpanId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$", description="W3C parent-id")]
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
UtcTime = Annotated[datetime, msgspec.Meta(tz=True, description="UTC, microseconds")]


class Envelope(msgspec.Struct, Generic[P], frozen=True, kw_only=True):
    """One event: who, which stream and where in it, why, and the typed payload."""

    event_id: UUID7
    type: Ident
    schema: Annotated[int, msgspec.Meta(ge=1)]
    occurred_at: UtcTime
    stream_id: Ident
    stream_version: Annotated[int, msgspec.Meta(ge=1, description="gapless, from 1")]
    tenant_id: Ident
    user_id: Ident
    trace_id: TraceId
    span_id: SpanId
    correlation_id: Ident
    causation_id: Ident | None = None
    prev_hash: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^([0-9a-f]{64})?$",
            description="SHA-256 of the stream's previous event (events/chain.py); empty"
            " for a stream's first event",
        ),
    ] = ""
    payload: P

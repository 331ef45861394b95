"""The event archive projector: every event becomes one row, keyed by event_id.

The archive keeps every event beyond the broker's retention; it stores the
event's exact bytes (`body`) next to the envelope columns, so replay from the
archive reads the same events the broker held.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from events import Envelope

ARCHIVE_TABLE = "events"


class ArchiveRow(NamedTuple):
    """One archived event; the fields are the `events` table's columns, in order."""

    event_id: str
    type: str
    schema: int
    occurred_at: datetime
    stream_id: str
    stream_version: int
    tenant_id: str
    user_id: str
    trace_id: str
    span_id: str
    correlation_id: str
    causation_id: str
    body: str
    topic: str
    partition: int
    offset: int


ARCHIVE_COLUMNS: tuple[str, ...] = ArchiveRow._fields


def archive_row(
    event: Envelope[Any], body: bytes, *, topic: str, partition: int, offset: int
) -> ArchiveRow:
    """The archive row of one decoded event and its original bytes."""
    return ArchiveRow(
        event_id=event.event_id,
        type=event.type,
        schema=event.schema,
        occurred_at=event.occurred_at,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        tenant_id=event.tenant_id,
        user_id=event.user_id,
        trace_id=event.trace_id,
        span_id=event.span_id,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id or "",
        body=body.decode("utf-8"),
        topic=topic,
        partition=partition,
        offset=offset,
    )

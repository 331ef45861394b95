"""The archive projector: one row per event, keeping the exact bytes and the log position."""

from __future__ import annotations

from events import encode
from streams.archive import ARCHIVE_COLUMNS, archive_row
from tests.factories import make_event


def test_row_keeps_envelope_bytes_and_position() -> None:
    event = make_event(stream_id="ctx-9", version=3)
    body = encode(event)
    row = archive_row(event, body, topic="chatllm.events", partition=2, offset=41)
    assert row.event_id == event.event_id
    assert (row.stream_id, row.stream_version, row.tenant_id) == ("ctx-9", 3, "t1")
    assert row.body.encode() == body
    assert (row.topic, row.partition, row.offset) == ("chatllm.events", 2, 41)
    assert row.causation_id == ""  # none, stored as empty
    assert len(row) == len(ARCHIVE_COLUMNS)

"""In-memory adapters of the ports: for unit tests and single-process experiments.

They obey the same contracts as the real adapters (tests/integration/test_contracts.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from events import Envelope, decode, encode
from streams.archive import ArchiveRow


class InMemoryLog:
    """An event log in a list: EventSink and StreamReader. Events are stored encoded,
    so whatever reads them back gets what a Kafka consumer would."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []
        self.fail_next: BaseException | None = None

    async def append(self, events: Sequence[Envelope[Any]]) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        encoded = [(event.stream_id, encode(event)) for event in events]
        await asyncio.sleep(0)  # an append is a suspension point, as with a broker
        self.records.extend(encoded)

    async def read_stream(self, stream_id: str) -> list[Envelope[Any]]:
        seen: set[int] = set()
        found = []
        for key, value in self.records:
            if key != stream_id:
                continue
            event = decode(value)
            if event.stream_version not in seen:
                seen.add(event.stream_version)
                found.append(event)
        return found


class InMemoryArchive:
    """An ArchiveSink in a dict keyed by event_id (so re-writes are idempotent)."""

    def __init__(self) -> None:
        self.rows: dict[str, ArchiveRow] = {}
        self.writes = 0

    async def write_archive(self, rows: Sequence[ArchiveRow]) -> None:
        self.writes += 1
        for row in rows:
            self.rows[row.event_id] = row

    def stream(self, tenant_id: str, stream_id: str) -> list[ArchiveRow]:
        return sorted(
            (
                r
                for r in self.rows.values()
                if r.tenant_id == tenant_id and r.stream_id == stream_id
            ),
            key=lambda r: (r.stream_version, r.event_id),
        )

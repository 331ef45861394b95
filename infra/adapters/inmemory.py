"""In-memory adapters of the ports: for unit tests and single-process experiments.

They obey the same contracts as the real adapters (tests/integration/test_contracts.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from events import Envelope, decode, encode
from streams.archive import ArchiveRow
from streams.ports import ProjectionBatch
from streams.projections import FACTS_TABLE, FactRow, Row, is_pruned, redact


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


class InMemoryProjections:
    """A ProjectionSink in dicts keyed by event_id (so re-writes are idempotent), with the
    same prune semantics as ClickHouse: a redacted row wins over its original."""

    def __init__(self) -> None:
        self.rows: dict[str, ArchiveRow] = {}
        self.tables: dict[str, dict[str, Row]] = {}
        self.cutoffs: dict[str, datetime] = {}
        self.writes = 0

    async def write_archive(self, rows: Sequence[ArchiveRow]) -> None:
        self.writes += 1
        for row in rows:
            self.rows[row.event_id] = row

    async def write(self, batch: ProjectionBatch) -> None:
        await self.write_archive(batch.archive)
        for table, rows in batch.rows.items():
            held = self.tables.setdefault(table, {})
            for row in rows:
                if isinstance(row, FactRow) and is_pruned(row, self.cutoffs.get(row.tenant_id)):
                    row = redact(row)  # an old event redelivered after its prune
                old = held.get(row.event_id)
                if isinstance(old, FactRow) and old.redacted:
                    continue
                held[row.event_id] = row
        for tenant, cutoff in batch.prunes.items():
            if tenant in self.cutoffs and self.cutoffs[tenant] >= cutoff:
                continue
            self.cutoffs[tenant] = cutoff
            facts = self.tables.setdefault(FACTS_TABLE, {})
            for event_id, fact in facts.items():
                assert isinstance(fact, FactRow)
                if fact.tenant_id == tenant and is_pruned(fact, cutoff) and not fact.redacted:
                    facts[event_id] = redact(fact)

    def stream(self, tenant_id: str, stream_id: str) -> list[ArchiveRow]:
        return sorted(
            (
                r
                for r in self.rows.values()
                if r.tenant_id == tenant_id and r.stream_id == stream_id
            ),
            key=lambda r: (r.stream_version, r.event_id),
        )

"""Sinks the stream processors write to. Adapters live in infra/."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from events import Envelope
from streams.archive import ArchiveRow
from streams.projections import Row


@dataclass
class ProjectionBatch:
    """What one batch of events adds to the read side."""

    archive: list[ArchiveRow] = field(default_factory=list)
    rows: dict[str, list[Row]] = field(default_factory=dict)
    """Projected rows by table."""
    prunes: dict[str, datetime] = field(default_factory=dict)
    """Tenant -> the newest memory-prune cutoff in the batch (applied after the rows)."""

    def __len__(self) -> int:
        return len(self.archive)


class ProjectionSink(Protocol):
    """Stores projected rows idempotently (a row re-written with the same event_id is kept
    once) and applies memory prunes."""

    async def write(self, batch: ProjectionBatch) -> None:
        """Durably store the batch or raise; called before the offsets are committed."""
        ...


class EventAppender(Protocol):
    """Appends events to the log (the processors' own findings); returns once acknowledged."""

    async def append(self, events: Sequence[Envelope[Any]]) -> None: ...


class DeadLetterSink(Protocol):
    """Keeps what could not be decoded, with the reason; returns once it is acknowledged."""

    async def dead_letter(
        self, *, key: bytes | None, value: bytes | None, reason: str, source: str
    ) -> None:
        """Durably store the original record with its reason or raise."""
        ...


class ObservationSink(Protocol):
    """Publishes keyed records of observations (events/observations.py) for the stateful
    detectors; returns once the broker acknowledged them all."""

    async def publish(self, records: Sequence[tuple[str, bytes]]) -> None: ...

    async def stop(self) -> None: ...

"""Sinks the stream processors write to. Adapters live in infra/."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from streams.archive import ArchiveRow


class ArchiveSink(Protocol):
    """Stores archive rows idempotently (a row re-written with the same event_id is kept once)."""

    async def write_archive(self, rows: Sequence[ArchiveRow]) -> None:
        """Durably store `rows` or raise; called before the offsets are committed."""
        ...


class DeadLetterSink(Protocol):
    """Keeps what could not be decoded, with the reason; returns once it is acknowledged."""

    async def dead_letter(
        self, *, key: bytes | None, value: bytes | None, reason: str, source: str
    ) -> None:
        """Durably store the original record with its reason or raise."""
        ...

"""Builders of test events and a deterministic clock (pure; no I/O)."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from events import CURRENT_SCHEMA, Envelope, Event, MessageReceived

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def uuid7_from(n: int) -> str:
    """A valid, deterministic UUIDv7 string for counter `n`."""
    value = (n & ((1 << 48) - 1)) << 80 | 0x7 << 76 | 0b10 << 62 | (n & 0xFFFF)
    return str(uuid.UUID(int=value))


class FakeClock:
    """Deterministic time (1 ms per call) and ids, so a run is reproducible."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._ticks = itertools.count()

    def now(self) -> datetime:
        return BASE_TIME + timedelta(milliseconds=next(self._ticks))

    def monotonic(self) -> float:
        return next(self._ticks) / 1000

    def new_event_id(self) -> str:
        return uuid7_from(next(self._ids))

    def new_span_id(self) -> str:
        return f"{next(self._ids):016x}"


def make_event(
    stream_id: str = "ctx-1",
    version: int = 1,
    payload: Event | None = None,
    *,
    n: int | None = None,
    tenant_id: str = "t1",
    user_id: str = "u1",
) -> Envelope[Any]:
    """A valid event; `n` makes its id unique (defaults to the version)."""
    payload = payload or MessageReceived(message_id=f"m{version}", content=f"hello {version}")
    n = version if n is None else n
    return Envelope(
        event_id=uuid7_from(n),
        type=type(payload).__name__,
        schema=CURRENT_SCHEMA[type(payload)],
        occurred_at=BASE_TIME + timedelta(seconds=n),
        stream_id=stream_id,
        stream_version=version,
        tenant_id=tenant_id,
        user_id=user_id,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        correlation_id="req-1",
        payload=payload,
    )

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


def make_turn(
    n: int,
    *,
    context: str = "ctx-1",
    version: int = 1,
    tenant_id: str = "t1",
    user_id: str = "u1",
    question: str = "What is the capital of Portugal?",
    latency_ms: float = 12.0,
    model: str = "demo-1",
    outcome: str = "ok",
    at: datetime | None = None,
) -> list[Envelope[Any]]:
    """The events of one chat turn as the gateway appends them (ids from `n * 16`).

    `version` is the context's next stream version (1 creates the context); `outcome`
    is ok, failed or denied.
    """
    from events import (
        ContextCreated,
        InputChecked,
        ModelCalled,
        RateLimitChecked,
        ReplyCompleted,
        ReplyFailed,
        RouteDecided,
        SentimentScored,
    )

    start = at or BASE_TIME + timedelta(seconds=n)
    message_id, reply_id = f"m{n}", f"r{n}"
    payloads: list[Event] = [] if version > 1 else [ContextCreated()]
    payloads.append(RateLimitChecked(allowed=outcome != "denied", limit="user/hour"))
    if outcome != "denied":
        payloads += [
            InputChecked(message_id=message_id, verdict="allow", length=len(question)),
            MessageReceived(message_id=message_id, content=question, tokens=7),
            SentimentScored(message_id=message_id, label="neutral", score=0.0),
            RouteDecided(
                in_reply_to=message_id,
                model=model,
                chain=(model,),
                complexity=0.1,
                features={"length": 0.1},
                band="simple",
                reason="table",
                policy_version="v1",
            ),
        ]
        failed = outcome == "failed"
        payloads.append(
            ModelCalled(
                in_reply_to=message_id,
                model=model,
                deployment=f"{model}-a",
                attempt=1,
                outcome="network" if failed else "ok",
                latency_ms=latency_ms,
            )
        )
        payloads.append(
            ReplyFailed(in_reply_to=message_id, error_class="network", message="down")
            if failed
            else ReplyCompleted(
                message_id=reply_id,
                in_reply_to=message_id,
                content="Lisbon.",
                model=model,
                latency_ms=latency_ms,
                prompt_tokens=7,
                completion_tokens=2,
                deployment=f"{model}-a",
            )
        )
    return [
        Envelope(
            event_id=uuid7_from(n * 16 + i),
            type=type(p).__name__,
            schema=CURRENT_SCHEMA[type(p)],
            occurred_at=start + timedelta(microseconds=i),
            stream_id=context,
            stream_version=version + i,
            tenant_id=tenant_id,
            user_id=user_id,
            trace_id="0af7651916cd43dd8448eb211c80319c",
            span_id="b7ad6b7169203331",
            correlation_id=f"turn-{n}",
            payload=p,
        )
        for i, p in enumerate(payloads)
    ]

"""The event bus on the real broker: emit appends to the log; a durable subscriber gets
what it missed from its last position; history reads the log back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from events import FeedbackGiven
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaStreamReader
from infra.services.bus import EventBus
from tests.conftest import Topics

pytestmark = pytest.mark.integration


async def until(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def feedback(n: int) -> FeedbackGiven:
    return FeedbackGiven(message_id=f"r{n}", thumbs="up", reason=f"#{n}")


async def test_emit_subscribe_miss_and_catch_up(broker: EmbeddedBroker, topics: Topics) -> None:
    got: list[str] = []
    subscriber = EventBus(broker.bootstrap_servers, name="billing", topic=topics.events)

    def broken(event: Any) -> None:
        raise ValueError("a bad plugin")

    subscriber.on("FeedbackGiven", lambda e: got.append(e.payload.reason))
    subscriber.on("*", broken, priority=1)
    emitter = EventBus(broker.bootstrap_servers, name="emitter", topic=topics.events)

    # Step 1: while the subscriber runs, emitted events reach it (despite a failing handler).
    async with subscriber.running():
        first = await emitter.emit(feedback(1), tenant_id="acme", user_id="bob")
        await until(lambda: got == ["#1"], "the first event")
    assert subscriber.failures and "a bad plugin" in subscriber.failures[0].error
    # emit appended to the log itself: any reader of the log sees it.
    logged = await KafkaStreamReader(broker.bootstrap_servers, topics.events).read_stream(
        first.stream_id
    )
    assert [e.event_id for e in logged] == [first.event_id]

    # Step 2: events emitted while the subscriber is away ...
    for n in (2, 3):
        await emitter.emit(feedback(n), tenant_id="acme")
    # ... reach it when it runs again under its name, and the old one does not come twice.
    again = EventBus(broker.bootstrap_servers, name="billing", topic=topics.events)
    again.on("FeedbackGiven", lambda e: got.append(e.payload.reason))
    async with again.running():
        await until(lambda: len(got) >= 3, "the missed events")
        await asyncio.sleep(0.5)
    # Each emitted event is a stream of its own: the log orders a stream, not streams
    # across partitions.
    assert got[0] == "#1" and sorted(got[1:]) == ["#2", "#3"]

    # Step 3: history reads the log from its beginning.
    history = await emitter.history("Feedback*")
    assert [e.payload.reason for e in history] == ["#1", "#2", "#3"]
    await emitter.close()


async def test_emit_needs_a_tenant(broker: EmbeddedBroker, topics: Topics) -> None:
    bus = EventBus(broker.bootstrap_servers, name="x", topic=topics.events)
    with pytest.raises(ValueError, match="tenant"):
        await bus.emit(feedback(1))
    with pytest.raises(ValueError, match="name"):
        EventBus(broker.bootstrap_servers, name="")

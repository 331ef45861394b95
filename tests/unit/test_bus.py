"""The bus's dispatch (pure): patterns, filters, priorities, async handlers, isolation."""

from __future__ import annotations

from typing import Any

from events import FeedbackGiven, ReplyCompleted
from streams.bus import Dispatcher
from tests.factories import make_event


def reply(n: int, tenant: str = "t1") -> Any:
    payload = ReplyCompleted(
        message_id=f"r{n}", in_reply_to="m", content="a", model="demo-1", latency_ms=1.0
    )
    return make_event("ctx-1", n, payload, n=n, tenant_id=tenant)


async def test_patterns_filters_and_priorities() -> None:
    bus, seen = Dispatcher(), []

    async def late(e: Any) -> None:
        seen.append(("late", e.stream_version))

    bus.on("ReplyCompleted", lambda e: seen.append(("exact", e.stream_version)))
    bus.on("Reply*", late, priority=-1)
    bus.on("*", lambda e: seen.append(("first", e.stream_version)), priority=10)
    bus.on(
        "Reply*",
        lambda e: seen.append(("acme", e.stream_version)),
        filter=lambda e: e.tenant_id == "acme",
    )
    await bus.dispatch(reply(1))
    assert seen == [("first", 1), ("exact", 1), ("late", 1)]
    seen.clear()
    await bus.dispatch(reply(2, tenant="acme"))
    assert ("acme", 2) in seen
    seen.clear()
    await bus.dispatch(make_event("c", 3, FeedbackGiven(message_id="r1", thumbs="up"), n=3))
    assert seen == [("first", 3)]


async def test_a_failing_handler_is_isolated_and_reported() -> None:
    bus, seen = Dispatcher(), []

    def boom(e: Any) -> None:
        raise RuntimeError("plugin bug")

    bus.on("*", boom, priority=5)
    bus.on("*", lambda e: seen.append(e.event_id))
    event = reply(1)
    (failure,) = await bus.dispatch(event)
    assert seen == [event.event_id]
    assert failure.event_id == event.event_id and "plugin bug" in failure.error
    assert "boom" in failure.handler


def test_a_subscription_can_be_removed() -> None:
    bus = Dispatcher()
    sub = bus.on("*", lambda e: None)
    bus.off(sub)
    assert bus.subscriptions == []

"""The context's pure core and the actor around it, with the in-memory log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from actors.context import (
    ContextActor,
    ContextRejected,
    ContextState,
    SendMessage,
    VersionConflict,
    decide_message,
    evolve,
    fold,
)
from actors.ports import ChatMessage, Completion, ModelError
from events import ContextCreated, MessageReceived, ReplyCompleted, ReplyFailed
from infra.memory import InMemoryLog
from infra.models import DemoModel
from tests.factories import FakeClock, make_event


def command(text: str = "hi", *, context: str = "ctx-1", tenant: str = "t1") -> SendMessage:
    return SendMessage(
        context_id=context,
        tenant_id=tenant,
        user_id="u1",
        content=text,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        correlation_id="req-1",
    )


def test_first_message_creates_the_context() -> None:
    decided = decide_message(ContextState(context_id="ctx-1"), command(), "m1")
    assert decided == [ContextCreated(title=""), MessageReceived(message_id="m1", content="hi")]


def test_evolve_rejects_gaps_duplicates_and_foreign_streams() -> None:
    state = evolve(
        ContextState(context_id="ctx-1"), make_event(version=1, payload=ContextCreated())
    )
    with pytest.raises(VersionConflict, match="expected version 2, got 3"):
        evolve(state, make_event(version=3))
    with pytest.raises(VersionConflict, match="expected version 2, got 1"):
        evolve(state, make_event(version=1))
    with pytest.raises(VersionConflict, match="applied to"):
        evolve(state, make_event(stream_id="other", version=2))


def test_state_is_a_fold_of_the_events() -> None:
    events = [
        make_event(version=1, payload=ContextCreated(title="t")),
        make_event(version=2, payload=MessageReceived(message_id="m1", content="q")),
        make_event(
            version=3,
            payload=ReplyCompleted(
                message_id="r1", in_reply_to="m1", content="a", model="demo-1", latency_ms=1
            ),
        ),
        make_event(
            version=4, payload=ReplyFailed(in_reply_to="m1", error_class="timeout", message="")
        ),
    ]
    state = fold(ContextState(context_id="ctx-1"), events)
    assert state.version == 4
    assert state.tenant_id == "t1" and state.title == "t"
    assert state.messages == (
        ChatMessage(role="user", content="q", message_id="m1"),
        ChatMessage(role="assistant", content="a", message_id="r1"),
    )


def make_actor(
    log: InMemoryLog, model: object | None = None, context: str = "ctx-1"
) -> ContextActor:
    return ContextActor(
        context,
        sink=log,
        model=model or DemoModel(),
        clock=FakeClock(),
        history=[],  # type: ignore[arg-type]
    )


async def test_a_turn_writes_gapless_versions_and_returns_the_reply() -> None:
    log = InMemoryLog()
    actor = make_actor(log)
    first = await actor.send_message(command("hello"))
    second = await actor.send_message(command("again"))
    # Step 1: the turn's events are in the log before the call returned.
    events = await log.read_stream("ctx-1")
    assert [e.stream_version for e in events] == [1, 2, 3, 4, 5]
    assert [e.type for e in events] == [
        "ContextCreated",
        "MessageReceived",
        "ReplyCompleted",
        "MessageReceived",
        "ReplyCompleted",
    ]
    # Step 2: what the caller got is exactly what was logged.
    assert [*first.events, *second.events] == events
    assert first.ok and "hello" in first.reply
    # Step 3: the reply is caused by the message it answers, within one correlation.
    assert events[2].causation_id == events[1].event_id
    assert {e.correlation_id for e in events} == {"req-1"}


async def test_concurrent_messages_to_one_context_never_interleave() -> None:
    log = InMemoryLog()
    actor = make_actor(log, DemoModel(latency_ms=2))
    await asyncio.gather(*(actor.send_message(command(f"m{i}")) for i in range(10)))
    events = await log.read_stream("ctx-1")
    assert [e.stream_version for e in events] == list(range(1, 22))
    # Every reply directly follows the message it answers.
    for received, reply in zip(events[1::2], events[2::2], strict=True):
        assert reply.payload.in_reply_to == received.payload.message_id


async def test_a_restarted_actor_rebuilds_exactly_from_its_stream() -> None:
    log = InMemoryLog()
    actor = make_actor(log)
    for text in ("one", "two", "three"):
        await actor.send_message(command(text))
    rebuilt = ContextActor(
        "ctx-1",
        sink=log,
        model=DemoModel(),
        clock=FakeClock(),
        history=await log.read_stream("ctx-1"),
    )
    assert rebuilt.state == actor.state
    turn = await rebuilt.send_message(command("four"))
    assert turn.events[0].stream_version == 8


async def test_a_failed_append_leaves_state_behind_the_log_and_marks_the_actor() -> None:
    log = InMemoryLog()
    actor = make_actor(log)
    log.fail_next = ConnectionError("broker down")
    with pytest.raises(ConnectionError):
        await actor.send_message(command())
    assert actor.broken
    assert actor.state.version == 0  # the state never runs ahead of the log


class FailingModel:
    name = "flaky"

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        raise ModelError("timeout", "no answer in 30 s")


async def test_a_model_failure_is_recorded_not_swallowed() -> None:
    log = InMemoryLog()
    turn = await make_actor(log, FailingModel()).send_message(command())
    assert not turn.ok and turn.error_class == "timeout"
    last = (await log.read_stream("ctx-1"))[-1]
    assert last.payload == ReplyFailed(
        in_reply_to=turn.events[1].payload.message_id,
        error_class="timeout",
        message="no answer in 30 s",
    )


async def test_another_tenant_cannot_write_to_a_context() -> None:
    log = InMemoryLog()
    actor = make_actor(log)
    await actor.send_message(command(tenant="t1"))
    with pytest.raises(ContextRejected, match="another tenant"):
        await actor.send_message(command(tenant="t2"))
    assert len(await log.read_stream("ctx-1")) == 3


async def test_demo_model_is_deterministic() -> None:
    messages = [ChatMessage(role="user", content="what is a log?")]
    first = await DemoModel().complete(messages)
    assert first == await DemoModel().complete(messages)
    assert "what is a log?" in first.content
    assert first.completion_tokens > 0 and first.prompt_tokens == 4

"""The context's pure core and the actor around it, with the in-memory log."""

from __future__ import annotations

import pytest

from actors.context import (
    CommandRejected,
    ContextActor,
    ContextCommand,
    ContextRejected,
    ContextState,
    RequestMeta,
    VersionConflict,
    decide_command,
    evolve,
    fold,
)
from actors.ports import ChatMessage
from events import (
    ContextCreated,
    MessageReceived,
    RateLimitChecked,
    ReplyCompleted,
    ReplyFailed,
)
from infra.adapters.inmemory import InMemoryLog
from tests.factories import FakeClock, make_event


def meta(context: str = "ctx-1", tenant: str = "t1") -> RequestMeta:
    return RequestMeta(
        context_id=context,
        tenant_id=tenant,
        user_id="u1",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        correlation_id="req-1",
    )


def reply(model: str = "demo-1", fallback: bool = False) -> ReplyCompleted:
    return ReplyCompleted(
        message_id="r1", in_reply_to="m1", content="a", model=model, latency_ms=1, fallback=fallback
    )


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
        make_event(version=2, payload=RateLimitChecked(allowed=True)),
        make_event(version=3, payload=MessageReceived(message_id="m1", content="q")),
        make_event(version=4, payload=reply("demo-large")),
        make_event(
            version=5, payload=ReplyFailed(in_reply_to="m1", error_class="timeout", message="")
        ),
    ]
    state = fold(ContextState(context_id="ctx-1"), events)
    assert state.version == 5
    assert (state.tenant_id, state.title, state.model) == ("t1", "t", "demo-large")
    assert state.messages == (
        ChatMessage(role="user", content="q", message_id="m1"),
        ChatMessage(role="assistant", content="a", message_id="r1"),
    )


def test_a_fallback_reply_does_not_move_the_conversation_off_its_model() -> None:
    events = [
        make_event(version=1, payload=reply("demo-1")),
        make_event(version=2, payload=reply("demo-fallback", True)),
    ]
    assert fold(ContextState(context_id="ctx-1"), events).model == "demo-1"


def test_the_first_event_of_any_kind_fixes_the_tenant() -> None:
    # A denied first request still opens the stream; the context then belongs to that tenant.
    state = evolve(
        ContextState(context_id="ctx-1"),
        make_event(version=1, payload=RateLimitChecked(allowed=False)),
    )
    assert state.tenant_id == "t1"


async def test_record_assigns_gapless_versions_and_causation() -> None:
    log = InMemoryLog()
    actor = ContextActor("ctx-1", sink=log, clock=FakeClock())
    first = await actor.record(
        [ContextCreated(), MessageReceived(message_id="m1", content="q")], meta(), "m1"
    )
    second = await actor.record([reply()], meta())
    assert [e.stream_version for e in first + second] == [1, 2, 3]
    assert await log.read_stream("ctx-1") == first + second
    assert first[1].causation_id is None  # the message itself is caused by the request


async def test_events_after_the_message_are_caused_by_it() -> None:
    actor = ContextActor("ctx-1", sink=InMemoryLog(), clock=FakeClock())
    events = await actor.record(
        [MessageReceived(message_id="m1", content="q"), RateLimitChecked(allowed=True), reply()],
        meta(),
        "m1",
    )
    assert events[1].causation_id == events[0].event_id == events[2].causation_id


async def test_a_failed_append_leaves_state_behind_the_log_and_marks_the_actor() -> None:
    log = InMemoryLog()
    actor = ContextActor("ctx-1", sink=log, clock=FakeClock())
    log.fail_next = ConnectionError("broker down")
    with pytest.raises(ConnectionError):
        await actor.record([ContextCreated()], meta())
    assert actor.broken
    assert actor.state.version == 0  # the state never runs ahead of the log


async def test_a_restarted_actor_rebuilds_exactly_from_its_stream() -> None:
    log = InMemoryLog()
    actor = ContextActor("ctx-1", sink=log, clock=FakeClock())
    await actor.record(
        [ContextCreated(), MessageReceived(message_id="m1", content="q"), reply()], meta()
    )
    rebuilt = ContextActor(
        "ctx-1", sink=log, clock=FakeClock(), history=await log.read_stream("ctx-1")
    )
    assert rebuilt.state == actor.state


async def test_another_tenant_cannot_write_to_a_context() -> None:
    actor = ContextActor("ctx-1", sink=InMemoryLog(), clock=FakeClock())
    await actor.record([ContextCreated()], meta(tenant="t1"))
    with pytest.raises(ContextRejected, match="another tenant"):
        actor.admit(meta(tenant="t2"))
    actor.admit(meta(tenant="t1"))


def command(**change: object) -> ContextCommand:
    return ContextCommand(meta=meta(), **change)  # type: ignore[arg-type]


def apply(state: ContextState, decided: list[object]) -> ContextState:
    events = [
        make_event(version=state.version + i, payload=p, n=100 + state.version + i)
        for i, p in enumerate(decided, 1)
    ]  # type: ignore[arg-type]
    return fold(state, events)


def test_documents_tags_and_overrides_are_folded_from_their_events() -> None:
    state = ContextState(context_id="ctx-1")
    attach = command(attach=("notes.md", "text/markdown", b"# Lisbon\nTram 28."))
    state = apply(state, decide_command(state, attach, max_document_bytes=1000, document_id="d1"))
    assert state.version == 2  # ContextCreated, DocumentAttached
    state = apply(
        state,
        decide_command(
            state, command(set_tags=("travel", "pt")), max_document_bytes=1, document_id="x"
        ),
    )
    state = apply(
        state,
        decide_command(
            state, command(set_tags=("travel", "food")), max_document_bytes=1, document_id="x"
        ),
    )
    assert state.tags == ("food", "travel")
    state = apply(
        state,
        decide_command(
            state,
            command(configure={"system_prompt": "Be brief.", "model": "demo-large"}),
            max_document_bytes=1,
            document_id="x",
        ),
    )
    state = apply(
        state,
        decide_command(
            state, command(configure={"model": ""}), max_document_bytes=1, document_id="x"
        ),
    )
    assert state.config == {"system_prompt": "Be brief."}
    prompt = state.prompt()
    assert prompt[0] == ChatMessage(role="system", content="Be brief.")
    assert prompt[1].content == "Attached document notes.md:\n# Lisbon\nTram 28."
    state = apply(
        state,
        decide_command(state, command(remove_document="d1"), max_document_bytes=1, document_id="x"),
    )
    assert state.documents == () and len(state.prompt()) == 1


def test_context_commands_reject_what_is_wrong() -> None:
    state = ContextState(context_id="ctx-1")
    with pytest.raises(CommandRejected, match="the limit is 10"):
        decide_command(
            state,
            command(attach=("big.bin", "application/octet-stream", b"x" * 11)),
            max_document_bytes=10,
            document_id="d",
        )
    with pytest.raises(CommandRejected, match="unknown context settings \\['temperature'\\]"):
        decide_command(
            state, command(configure={"temperature": "2"}), max_document_bytes=10, document_id="d"
        )
    with pytest.raises(CommandRejected, match="no document 'nope'"):
        decide_command(
            state, command(remove_document="nope"), max_document_bytes=10, document_id="d"
        )
    # Setting the tags a context already has changes nothing and records nothing.
    tagged = ContextState(context_id="ctx-1", version=3, tags=("a",))
    assert (
        decide_command(tagged, command(set_tags=("a",)), max_document_bytes=1, document_id="d")
        == []
    )

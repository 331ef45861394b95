"""The conversation context: a pure core (decide/evolve) and the actor around it.

State is a fold of the context's own events. The actor assigns gapless stream
versions, and acknowledges a turn only after the log has acknowledged its events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec

from actors.ports import ChatMessage, Completion, EventSink, ModelError, ModelProvider
from events import (
    CURRENT_SCHEMA,
    ContextCreated,
    Envelope,
    Event,
    MessageReceived,
    ReplyCompleted,
    ReplyFailed,
)


class SendMessage(msgspec.Struct, frozen=True, kw_only=True):
    """Command: a user says something in a context."""

    context_id: str
    tenant_id: str
    user_id: str
    content: str
    trace_id: str
    correlation_id: str
    title: str = ""


class ContextState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the context knows, derived from its events alone."""

    context_id: str
    version: int = 0
    tenant_id: str = ""
    owner_id: str = ""
    title: str = ""
    messages: tuple[ChatMessage, ...] = ()


class ChatTurn(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller gets back once the turn's events are acknowledged by the log."""

    context_id: str
    reply: str
    model: str
    ok: bool
    error_class: str = ""
    events: tuple[Envelope[Any], ...] = ()


class VersionConflict(Exception):
    """An event does not follow its stream's last version (a gap, a duplicate, a second writer)."""


class ContextRejected(Exception):
    """The command is not allowed for this context (for example, another tenant's context)."""


class Clock(Protocol):
    """Where time and identities come from; injected so a replay is deterministic."""

    def now(self) -> datetime: ...
    def monotonic(self) -> float: ...
    def new_event_id(self) -> str: ...
    def new_span_id(self) -> str: ...


# ---- pure core ---------------------------------------------------------------


def evolve(state: ContextState, event: Envelope[Any]) -> ContextState:
    """The state after `event`; VersionConflict unless it is the stream's next version."""
    if event.stream_id != state.context_id:
        raise VersionConflict(
            f"event of stream {event.stream_id!r} applied to {state.context_id!r}"
        )
    if event.stream_version != state.version + 1:
        raise VersionConflict(
            f"{state.context_id}: expected version {state.version + 1}, got {event.stream_version}"
        )
    payload = event.payload
    match payload:
        case ContextCreated(title=title):
            state = msgspec.structs.replace(
                state, tenant_id=event.tenant_id, owner_id=event.user_id, title=title
            )
        case MessageReceived(message_id=message_id, content=content, role=role):
            message = ChatMessage(role=role, content=content, message_id=message_id)
            state = msgspec.structs.replace(state, messages=(*state.messages, message))
        case ReplyCompleted(message_id=message_id, content=content):
            message = ChatMessage(role="assistant", content=content, message_id=message_id)
            state = msgspec.structs.replace(state, messages=(*state.messages, message))
        case ReplyFailed():
            pass
    return msgspec.structs.replace(state, version=event.stream_version)


def fold(state: ContextState, events: Iterable[Envelope[Any]]) -> ContextState:
    """Apply events in order."""
    for event in events:
        state = evolve(state, event)
    return state


def decide_message(state: ContextState, command: SendMessage, message_id: str) -> list[Event]:
    """The events that accept a user message (creating the context on its first one)."""
    if state.version and state.tenant_id != command.tenant_id:
        raise ContextRejected(f"context {state.context_id!r} belongs to another tenant")
    decided: list[Event] = []
    if state.version == 0:
        decided.append(ContextCreated(title=command.title))
    decided.append(MessageReceived(message_id=message_id, content=command.content))
    return decided


def decide_reply(
    in_reply_to: str, outcome: Completion | ModelError, latency_ms: float, message_id: str
) -> Event:
    """The event that records the model's answer or its classified failure."""
    if isinstance(outcome, ModelError):
        return ReplyFailed(
            in_reply_to=in_reply_to, error_class=outcome.error_class, message=outcome.message
        )
    return ReplyCompleted(
        message_id=message_id,
        in_reply_to=in_reply_to,
        content=outcome.content,
        model=outcome.model,
        latency_ms=max(latency_ms, 0.0),
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        finish_reason=outcome.finish_reason,
    )


def stamp(
    state: ContextState,
    payloads: Sequence[Event],
    command: SendMessage,
    clock: Clock,
    causation_id: str | None,
) -> list[Envelope[Any]]:
    """Wrap payloads in envelopes with the next gapless versions of the stream."""
    return [
        Envelope(
            event_id=clock.new_event_id(),
            type=type(payload).__name__,
            schema=CURRENT_SCHEMA[type(payload)],
            occurred_at=clock.now(),
            stream_id=state.context_id,
            stream_version=state.version + offset,
            tenant_id=command.tenant_id,
            user_id=command.user_id,
            trace_id=command.trace_id,
            span_id=clock.new_span_id(),
            correlation_id=command.correlation_id,
            causation_id=causation_id,
            payload=payload,
        )
        for offset, payload in enumerate(payloads, start=1)
    ]


# ---- the actor -----------------------------------------------------------------


class ContextActor:
    """One conversation context: the single writer of its stream."""

    def __init__(
        self,
        context_id: str,
        *,
        sink: EventSink,
        model: ModelProvider,
        clock: Clock,
        history: Iterable[Envelope[Any]] = (),
    ) -> None:
        self._state = fold(ContextState(context_id=context_id), history)
        self._sink = sink
        self._model = model
        self._clock = clock
        self._lock = asyncio.Lock()
        self.broken = False

    @property
    def state(self) -> ContextState:
        """The current state (immutable)."""
        return self._state

    async def send_message(self, command: SendMessage) -> ChatTurn:
        """Record the message, ask the model, record the reply; return once all are in the log."""
        if command.context_id != self._state.context_id:
            raise ContextRejected(
                f"command for {command.context_id!r} sent to {self._state.context_id!r}"
            )
        async with self._lock:
            accepted = stamp(
                self._state,
                decide_message(self._state, command, self._clock.new_event_id()),
                command,
                self._clock,
                causation_id=None,
            )
            await self._append(accepted)
            received = accepted[-1]
            started = self._clock.monotonic()
            outcome: Completion | ModelError
            try:
                outcome = await self._model.complete(self._state.messages)
            except ModelError as exc:
                outcome = exc
            latency_ms = (self._clock.monotonic() - started) * 1000.0
            reply_payload = decide_reply(
                received.payload.message_id, outcome, latency_ms, self._clock.new_event_id()
            )
            reply = stamp(self._state, [reply_payload], command, self._clock, received.event_id)
            await self._append(reply)
        if isinstance(outcome, ModelError):
            return ChatTurn(
                context_id=self._state.context_id,
                reply="",
                model=self._model.name,
                ok=False,
                error_class=outcome.error_class,
                events=(*accepted, *reply),
            )
        return ChatTurn(
            context_id=self._state.context_id,
            reply=outcome.content,
            model=outcome.model,
            ok=True,
            events=(*accepted, *reply),
        )

    async def _append(self, events: list[Envelope[Any]]) -> None:
        # Validate against the state first, then make durable, then commit in memory:
        # the state never runs ahead of the log.
        next_state = fold(self._state, events)
        try:
            await self._sink.append(events)
        except BaseException:
            # Part of the batch may be in the log: only a reload from the log is exact now.
            self.broken = True
            raise
        self._state = next_state

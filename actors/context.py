"""The conversation context: its state is a fold of its own events, and the actor is
the single writer of its stream (gapless versions, acknowledged before returning)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec

from actors.ports import ChatMessage, EventSink
from events import (
    CURRENT_SCHEMA,
    ContextConfigured,
    ContextCreated,
    DocumentAttached,
    DocumentRemoved,
    Envelope,
    Event,
    FeedbackGiven,
    MessageReceived,
    ReplyCompleted,
    ReplyRewritten,
    RouteDecided,
    TagsChanged,
)
from events.chain import event_hash
from events.codec import decode, encode

# What a context may override, and what each override does in a turn.
CONFIG_KEYS = {
    "model": "ask for this model on every turn (the router still falls back when it fails)",
    "system_prompt": "a system message placed before the conversation",
}
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-yaml")


def is_text(mime_type: str) -> bool:
    """Whether a document of this type is given to the model as text."""
    return mime_type.startswith(TEXT_TYPES)


class RequestMeta(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks, and the trace and correlation every event of the request carries."""

    context_id: str
    tenant_id: str
    user_id: str
    trace_id: str
    correlation_id: str
    span_id: str = ""
    """The span acting for the request (events carry it); empty: a new span id per event."""


class ContextState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the context knows, derived from its events alone."""

    context_id: str
    version: int = 0
    tenant_id: str = ""
    owner_id: str = ""
    title: str = ""
    model: str = ""
    """The model that answered last (for sticky routing); empty if none yet."""
    messages: tuple[ChatMessage, ...] = ()
    documents: tuple[DocumentAttached, ...] = ()
    tags: tuple[str, ...] = ()
    config: dict[str, str] = msgspec.field(default_factory=dict)
    last_hash: str = ""
    """The audit-chain hash of the last event (the next event's prev_hash)."""
    replies: dict[str, tuple[str, str]] = msgspec.field(default_factory=dict)
    """Each reply's (model, band): what feedback on it teaches routing."""
    last_band: str = ""

    def prompt(self) -> list[ChatMessage]:
        """What the model sees: the system prompt, text documents, then the conversation."""
        head: list[ChatMessage] = []
        if self.config.get("system_prompt"):
            head.append(ChatMessage(role="system", content=self.config["system_prompt"]))
        for doc in self.documents:
            if is_text(doc.mime_type):
                text = doc.content.decode("utf-8", errors="replace")
                head.append(
                    ChatMessage(role="system", content=f"Attached document {doc.name}:\n{text}")
                )
        return [*head, *self.messages]


class VersionConflict(Exception):
    """An event does not follow its stream's last version (a gap, a duplicate, a second writer)."""


class ContextRejected(Exception):
    """The request is not allowed for this context (for example, another tenant's context)."""


class Clock(Protocol):
    """Where time and identities come from; injected so a replay is deterministic."""

    def now(self) -> datetime: ...
    def monotonic(self) -> float: ...
    def new_event_id(self) -> str: ...
    def new_span_id(self) -> str: ...


def evolve(state: ContextState, event: Envelope[Any], digest: str | None = None) -> ContextState:
    """The state after `event`; VersionConflict unless it is the stream's next version.
    `digest` is the original payload's digest of an event whose content was erased (its
    hash in the audit chain is made of it)."""
    if event.stream_id != state.context_id:
        raise VersionConflict(
            f"event of stream {event.stream_id!r} applied to {state.context_id!r}"
        )
    if event.stream_version != state.version + 1:
        raise VersionConflict(
            f"{state.context_id}: expected version {state.version + 1}, got {event.stream_version}"
        )
    if state.version == 0:  # the first event, whatever it is, fixes the owner
        state = msgspec.structs.replace(state, tenant_id=event.tenant_id, owner_id=event.user_id)
    # Decisions (limits, routing, model calls) change only the version, not the conversation.
    match event.payload:
        case ContextCreated(title=title):
            state = msgspec.structs.replace(state, title=title)
        case MessageReceived(message_id=message_id, content=content, role=role):
            message = ChatMessage(
                role=role,
                content=content,
                message_id=message_id,
                tool_calls=event.payload.tool_calls,
                tool_call_id=event.payload.tool_call_id,
            )
            state = msgspec.structs.replace(state, messages=(*state.messages, message))
        case ReplyCompleted(message_id=message_id, content=content, model=model, fallback=fallback):
            message = ChatMessage(
                role="assistant",
                content=content,
                message_id=message_id,
                tool_calls=event.payload.tool_calls,
            )
            state = msgspec.structs.replace(
                state,
                messages=(*state.messages, message),
                model=state.model if fallback else model,
                replies={**state.replies, message_id: (model, state.last_band)},
                last_band="",
            )
        case RouteDecided(band=band):
            state = msgspec.structs.replace(state, last_band=band)
        case ReplyRewritten(message_id=message_id, content=content):
            # The conversation goes on from what the user received.
            messages = tuple(
                msgspec.structs.replace(m, content=content) if m.message_id == message_id else m
                for m in state.messages
            )
            state = msgspec.structs.replace(state, messages=messages)
        case DocumentAttached() as document:
            state = msgspec.structs.replace(state, documents=(*state.documents, document))
        case DocumentRemoved(document_id=document_id):
            kept = tuple(d for d in state.documents if d.document_id != document_id)
            state = msgspec.structs.replace(state, documents=kept)
        case TagsChanged(added=added, removed=removed):
            tags = (set(state.tags) | set(added)) - set(removed)
            state = msgspec.structs.replace(state, tags=tuple(sorted(tags)))
        case ContextConfigured(overrides=overrides):
            config = {**state.config, **overrides}
            config = {k: v for k, v in config.items() if v}
            state = msgspec.structs.replace(state, config=config)
    return msgspec.structs.replace(
        state, version=event.stream_version, last_hash=event_hash(event, digest)
    )


class DocumentInfo(msgspec.Struct, frozen=True, kw_only=True):
    document_id: str
    name: str
    mime_type: str
    size: int
    sha256: str


class ContextView(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller may see of a context's state (documents without their bytes)."""

    context_id: str
    version: int
    title: str
    model: str
    messages: int
    tags: tuple[str, ...]
    config: dict[str, str]
    documents: tuple[DocumentInfo, ...]


def view(state: ContextState) -> ContextView:
    return ContextView(
        context_id=state.context_id,
        version=state.version,
        title=state.title,
        model=state.model,
        messages=len(state.messages),
        tags=state.tags,
        config=dict(state.config),
        documents=tuple(
            DocumentInfo(
                document_id=d.document_id,
                name=d.name,
                mime_type=d.mime_type,
                size=d.size,
                sha256=d.sha256,
            )
            for d in state.documents
        ),
    )


class ContextCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A change to a context other than a chat turn; exactly one of the fields is set."""

    meta: RequestMeta
    attach: tuple[str, str, bytes] | None = None
    """(name, MIME type, bytes) of a document to attach."""
    remove_document: str = ""
    set_tags: tuple[str, ...] | None = None
    configure: dict[str, str] | None = None
    feedback: FeedbackGiven | None = None
    """A verdict on one of the context's replies."""
    rewrite: ReplyRewritten | None = None
    """A reply as plugins changed it before it was sent (what the user received)."""


class CommandRejected(ValueError):
    """The command is invalid for this context; the message says why (a 4xx)."""


def decide_command(
    state: ContextState, command: ContextCommand, *, max_document_bytes: int, document_id: str
) -> list[Event]:
    """The events a context command produces, or CommandRejected."""
    decided: list[Event] = [] if state.version else [ContextCreated()]
    if command.attach is not None:
        name, mime_type, content = command.attach
        if len(content) > max_document_bytes:
            raise CommandRejected(
                f"document {name!r} is {len(content)} bytes; the limit is {max_document_bytes}"
            )
        decided.append(
            DocumentAttached(
                document_id=document_id,
                name=name,
                mime_type=mime_type,
                size=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                content=content,
            )
        )
    elif command.remove_document:
        if not any(d.document_id == command.remove_document for d in state.documents):
            raise CommandRejected(f"no document {command.remove_document!r} in this context")
        decided.append(DocumentRemoved(document_id=command.remove_document))
    elif command.set_tags is not None:
        wanted = set(command.set_tags)
        added = tuple(sorted(wanted - set(state.tags)))
        removed = tuple(sorted(set(state.tags) - wanted))
        if not added and not removed:
            return decided  # nothing changes: no event
        decided.append(TagsChanged(added=added, removed=removed))
    elif command.configure is not None:
        unknown = sorted(set(command.configure) - set(CONFIG_KEYS))
        if unknown:
            raise CommandRejected(
                f"unknown context settings {unknown}; known: {sorted(CONFIG_KEYS)}"
            )
        decided.append(ContextConfigured(overrides=dict(command.configure)))
    elif command.feedback is not None:
        feedback = command.feedback
        if not any(
            m.message_id == feedback.message_id and m.role == "assistant" for m in state.messages
        ):
            raise CommandRejected(f"no reply {feedback.message_id!r} in this context")
        if not feedback.thumbs and not feedback.rating:
            raise CommandRejected("feedback needs thumbs (up/down) or a rating (1-5)")
        model, band = state.replies.get(feedback.message_id, ("", ""))
        decided.append(msgspec.structs.replace(feedback, model=model, band=band))
    elif command.rewrite is not None:
        if not any(
            m.message_id == command.rewrite.message_id and m.role == "assistant"
            for m in state.messages
        ):
            raise CommandRejected(f"no reply {command.rewrite.message_id!r} in this context")
        decided.append(command.rewrite)
    return decided


def fold(
    state: ContextState,
    events: Iterable[Envelope[Any]],
    digests: Mapping[str, str] | None = None,
) -> ContextState:
    """Apply events in order; `digests` by event id for erased ones (see evolve)."""
    for event in events:
        state = evolve(state, event, digests.get(event.event_id) if digests else None)
    return state


def stamp(
    state: ContextState,
    payloads: Sequence[Event],
    meta: RequestMeta,
    clock: Clock,
    cause_after: str | None = None,
    at: Mapping[int, datetime] | None = None,
) -> list[Envelope[Any]]:
    """Wrap payloads in envelopes with the next gapless versions of the stream.

    `at`: when payloads happened, by id(payload); the others get the clock's time now. Times
    never go back within the stream: an earlier one takes the time of the event before it.

    Events after the MessageReceived whose message_id is `cause_after` are caused by it.
    """
    stamped: list[Envelope[Any]] = []
    causation: str | None = None
    prev_hash = state.last_hash
    last_at: datetime | None = None
    for offset, payload in enumerate(payloads, start=1):
        happened = at.get(id(payload)) if at else None
        if happened is None:
            happened = clock.now()
        if last_at is not None and happened < last_at:
            happened = last_at
        last_at = happened
        event: Envelope[Any] = Envelope(
            event_id=clock.new_event_id(),
            type=type(payload).__name__,
            schema=CURRENT_SCHEMA[type(payload)],
            occurred_at=happened,
            stream_id=state.context_id,
            stream_version=state.version + offset,
            tenant_id=meta.tenant_id,
            user_id=meta.user_id,
            trace_id=meta.trace_id,
            span_id=meta.span_id or clock.new_span_id(),
            correlation_id=meta.correlation_id,
            causation_id=causation,
            prev_hash=prev_hash,
            payload=payload,
        )
        # As every reader will see it (an int where the type says float becomes a float):
        # the chain hashes that form, so a rebuilt context hashes the same.
        event = decode(encode(event))
        prev_hash = event_hash(event)
        stamped.append(event)
        if isinstance(payload, MessageReceived) and payload.message_id == cause_after:
            causation = event.event_id
    return stamped


class ContextActor:
    """One conversation context: the single writer of its stream."""

    def __init__(
        self,
        context_id: str,
        *,
        sink: EventSink,
        clock: Clock,
        history: Iterable[Envelope[Any]] = (),
        digests: Mapping[str, str] | None = None,
    ) -> None:
        self._state = fold(ContextState(context_id=context_id), history, digests)
        self._sink = sink
        self._clock = clock
        self.lock = asyncio.Lock()
        """Held for a whole turn, so a context's turns never interleave."""
        self.broken = False

    @property
    def state(self) -> ContextState:
        """The current state (immutable)."""
        return self._state

    def admit(self, meta: RequestMeta) -> None:
        """Raise ContextRejected unless `meta` may write to this context."""
        if meta.context_id != self._state.context_id:
            raise ContextRejected(
                f"request for {meta.context_id!r} sent to {self._state.context_id!r}"
            )
        if self._state.version and self._state.tenant_id != meta.tenant_id:
            raise ContextRejected(f"context {self._state.context_id!r} belongs to another tenant")

    async def record(
        self,
        payloads: Sequence[Event],
        meta: RequestMeta,
        cause_after: str | None = None,
        at: Mapping[int, datetime] | None = None,
    ) -> list[Envelope[Any]]:
        """Append the payloads as the stream's next events; return once the log has them.
        `at`: when payloads happened, by id (see `stamp`)."""
        events = stamp(self._state, payloads, meta, self._clock, cause_after, at)
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
        return events

"""The payloads of a chat turn: frozen msgspec Structs with past-tense names.

Schemas only grow: a new field gets a default, a field never changes type, and a
breaking change is a new type plus an upcaster (see events/upcasters.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class ContextCreated(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation context came into being; the first event of its stream."""

    title: str = ""


class MessageReceived(msgspec.Struct, frozen=True, kw_only=True):
    """A message entered the context (from the user, or a system prompt)."""

    message_id: NonEmpty
    content: str
    role: Literal["user", "system"] = "user"


class ReplyCompleted(msgspec.Struct, frozen=True, kw_only=True):
    """The model answered a message."""

    message_id: NonEmpty
    in_reply_to: NonEmpty
    content: str
    model: NonEmpty
    latency_ms: Annotated[float, msgspec.Meta(ge=0)]
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    completion_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    finish_reason: str = "stop"


class ReplyFailed(msgspec.Struct, frozen=True, kw_only=True):
    """The model could not answer a message; the error is classified, not swallowed."""

    in_reply_to: NonEmpty
    error_class: NonEmpty
    message: str
    model: str = ""


Event = ContextCreated | MessageReceived | ReplyCompleted | ReplyFailed

# The schema version each type is written with today. Bump it only together with
# an upcaster from the previous version (events/upcasters.py) and its test.
CURRENT_SCHEMA: dict[type[Event], int] = {
    ContextCreated: 1,
    MessageReceived: 1,
    ReplyCompleted: 1,
    ReplyFailed: 1,
}

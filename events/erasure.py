"""What a user's content is, per event type, and the event with it erased (pure).

Erasing keeps everything the audit chain and the projections' numbers need (ids, versions,
tokens, latencies, models, verdicts) and blanks what the user or a model wrote about them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events.types import (
    ContextCreated,
    DocumentAttached,
    FeedbackGiven,
    MessageReceived,
    ReplyCompleted,
    ReplyFailed,
    ReplyRewritten,
)

ERASED = "[erased]"

# Type -> the fields that hold content, and what they become.
CONTENT_FIELDS: dict[type, dict[str, Any]] = {
    MessageReceived: {"content": ""},
    ReplyCompleted: {"content": ""},
    ReplyRewritten: {"content": ""},
    ReplyFailed: {"message": ""},
    DocumentAttached: {"content": b"", "name": ERASED},
    FeedbackGiven: {"reason": ""},
    ContextCreated: {"title": ""},
}


def has_content(payload: Any) -> bool:
    return type(payload) in CONTENT_FIELDS


def erase(payload: Any) -> Any:
    """The payload with its content fields blanked (unchanged if it has none)."""
    fields = CONTENT_FIELDS.get(type(payload))
    return msgspec.structs.replace(payload, **fields) if fields else payload

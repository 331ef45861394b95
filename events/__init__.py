"""Event types, the envelope and the wire codec. Imports nothing of ours; no I/O."""

from events.codec import DecodeError, decode, encode, payload_type, registered_types
from events.envelope import Envelope
from events.types import (
    CURRENT_SCHEMA,
    ContextCreated,
    Event,
    MessageReceived,
    ReplyCompleted,
    ReplyFailed,
)

__all__ = [
    "CURRENT_SCHEMA",
    "ContextCreated",
    "DecodeError",
    "Envelope",
    "Event",
    "MessageReceived",
    "ReplyCompleted",
    "ReplyFailed",
    "decode",
    "encode",
    "payload_type",
    "registered_types",
]

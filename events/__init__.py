"""Event types, the envelope and the wire codec. Imports nothing of ours; no I/O."""

from events.codec import DecodeError, decode, encode, payload_type, registered_types
from events.envelope import Envelope
from events.types import (
    CURRENT_SCHEMA,
    CircuitChanged,
    ContextConfigured,
    ContextCreated,
    DocumentAttached,
    DocumentRemoved,
    Event,
    InputChecked,
    MessageReceived,
    ModelCalled,
    RateAdjusted,
    RateLimitChecked,
    ReplyCompleted,
    ReplyFailed,
    RouteDecided,
    SentimentScored,
    TagsChanged,
)

__all__ = [
    "CURRENT_SCHEMA",
    "CircuitChanged",
    "ContextConfigured",
    "ContextCreated",
    "DecodeError",
    "DocumentAttached",
    "DocumentRemoved",
    "Envelope",
    "Event",
    "InputChecked",
    "MessageReceived",
    "ModelCalled",
    "RateAdjusted",
    "RateLimitChecked",
    "ReplyCompleted",
    "ReplyFailed",
    "RouteDecided",
    "SentimentScored",
    "TagsChanged",
    "decode",
    "encode",
    "payload_type",
    "registered_types",
]

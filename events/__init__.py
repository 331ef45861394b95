"""Event types, the envelope and the wire codec. Imports nothing of ours; no I/O."""

from events.codec import DecodeError, decode, encode, payload_type, registered_types
from events.envelope import Envelope
from events.types import (
    CURRENT_SCHEMA,
    CircuitChanged,
    ContextCreated,
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
)

__all__ = [
    "CURRENT_SCHEMA",
    "CircuitChanged",
    "ContextCreated",
    "DecodeError",
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
    "decode",
    "encode",
    "payload_type",
    "registered_types",
]

"""JSON on the wire via msgspec, so any Kafka client can read and write events.

Decoding is two-pass: the envelope first (payload kept raw), then the payload with
the decoder of the type the envelope names, after upcasting an older schema.
Anything unknown or malformed raises DecodeError with a reason fit for a
dead-letter header.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any, get_args

import msgspec

from events.envelope import Envelope
from events.types import CURRENT_SCHEMA, Event
from events.upcasters import upcast

_TYPES: dict[str, type[Any]] = {cls.__name__: cls for cls in get_args(Event)}
_PAYLOAD_DECODERS = {name: msgspec.json.Decoder(cls) for name, cls in _TYPES.items()}
_RAW_DECODER = msgspec.json.Decoder(Envelope[msgspec.Raw])
_ENCODER = msgspec.json.Encoder()


class DecodeError(ValueError):
    """An event could not be decoded; `reason` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def registered_types() -> dict[str, type[Any]]:
    """Every event type by its wire name."""
    return dict(_TYPES)


def payload_type(name: str) -> type[Any]:
    """The payload class for a wire type name; DecodeError if unknown."""
    try:
        return _TYPES[name]
    except KeyError:
        raise DecodeError(f"unknown event type {name!r}") from None


def encode(event: Envelope[Any]) -> bytes:
    """The event as JSON bytes (the Kafka record value)."""
    expected = type(event.payload).__name__
    if event.type != expected:
        raise ValueError(f"envelope type {event.type!r} does not match payload {expected!r}")
    return _ENCODER.encode(event)


def decode(data: bytes | str) -> Envelope[Event]:
    """Validate and decode one event; DecodeError on anything unknown or malformed."""
    try:
        raw = _RAW_DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed envelope: {exc}") from None
    if raw.occurred_at.utcoffset() != UTC.utcoffset(None):
        raise DecodeError("malformed envelope: occurred_at must be UTC - at `$.occurred_at`")
    cls = payload_type(raw.type)
    current = CURRENT_SCHEMA[cls]
    try:
        if raw.schema < current:
            legacy = msgspec.json.decode(raw.payload)
            if not isinstance(legacy, dict):
                raise DecodeError(f"malformed {raw.type} payload: expected an object")
            payload = msgspec.convert(upcast(raw.type, raw.schema, current, legacy), cls)
        else:
            # A newer schema only added fields with defaults: read what we know.
            payload = _PAYLOAD_DECODERS[raw.type].decode(raw.payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"malformed {raw.type} payload: {exc}") from None
    except KeyError as exc:
        raise DecodeError(f"cannot upcast {raw.type}: {exc.args[0]}") from None
    return msgspec.structs.replace(raw, payload=payload)  # type: ignore[arg-type]


def to_builtins(event: Envelope[Any]) -> dict[str, Any]:
    """The event as plain JSON-compatible data (for JSON lines output)."""
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result

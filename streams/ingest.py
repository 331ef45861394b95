"""Ingest from upstream systems: what makes an upstream record an event of the log (pure).

An upstream event is the documented JSON envelope (docs/events.schema.json). It must decode
(envelope and payload: that includes a tenant), and live in a stream of the upstream's own: its
stream_id starts with one of the configured prefixes (`ext:` by default), so an upstream can
never write into a chat context, whose single writer is its shard.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import msgspec

from events import DecodeError, Envelope, decode

DEFAULT_PREFIXES = ("ext:",)
DEFAULT_TYPES = (
    "ContextCreated",
    "MessageReceived",
    "InputChecked",
    "SentimentScored",
    "ModelCalled",
    "ReplyCompleted",
    "ReplyFailed",
    "DocumentAttached",
    "DocumentRemoved",
    "TagsChanged",
)
"""What an upstream system may produce by default: what a conversation is made of. Events
that act on chat-llm itself (erasure, pruning, feedback that trains routing, config,
anomalies, workflows, rebuilds) are written by chat-llm only."""
DEFAULT_MAX_BYTES = 1_000_000
"""The largest record the log accepts by default (Kafka's message.max.bytes is ~1 MiB)."""
TENANT_HEADER = "chatllm.tenant"
"""Dead-letter header: the tenant the rejected record named, when it could be read."""


def validate(
    value: bytes | None,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    allowed_types: Collection[str] = DEFAULT_TYPES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Envelope[Any]:
    """The event an upstream record carries, or DecodeError with a one-line reason."""
    if not value:
        raise DecodeError("empty record (no value)")
    if max_bytes and len(value) > max_bytes:
        raise DecodeError(
            f"the event is {len(value)} bytes; the log accepts at most {max_bytes}"
            " (broker.max_record_bytes)"
        )
    event = decode(value)  # the envelope requires a tenant (and everything else)
    if not any(event.stream_id.startswith(p) for p in prefixes):
        raise DecodeError(
            f"stream_id {event.stream_id!r} is not an upstream stream: it must start with"
            f" one of {list(prefixes)} (chat contexts are written only by chat-llm)"
        )
    if event.type not in allowed_types:
        raise DecodeError(
            f"upstream systems may not produce {event.type} events"
            f" (ingest.allowed_types: {', '.join(sorted(allowed_types))})"
        )
    return event


class _TenantOnly(msgspec.Struct):
    tenant_id: str = ""


_tenant_decoder = msgspec.json.Decoder(_TenantOnly)


def tenant_hint(value: bytes | None) -> str:
    """The tenant a (possibly invalid) record names, or '' if it cannot be read."""
    if not value:
        return ""
    try:
        return _tenant_decoder.decode(value).tenant_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""

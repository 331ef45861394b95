"""Topic names, defined once. Kafka key = stream_id, so a stream stays on one partition."""

EVENTS = "chatllm.events"
"""The event log: the source of truth."""

INGEST = "chatllm.ingest"
"""Where upstream systems produce; validated, then appended to EVENTS."""

OBSERVATIONS = "chatllm.observations"
"""Compact facts for the stateful detectors (events/observations.py), written by the archive
writer in batches; derived data, read by the Faust processors."""

DEADLETTER = "chatllm.deadletter"
"""What failed validation: the original bytes, with the reason in the headers. Never dropped."""

# Header names on dead-letter records (values are UTF-8).
DLQ_REASON = "chatllm.dlq.reason"
DLQ_SOURCE = "chatllm.dlq.source"  # "topic/partition/offset" of the original record
DLQ_PROCESSOR = "chatllm.dlq.processor"
DLQ_FAILED_AT = "chatllm.dlq.failed_at"
ERASED_DIGEST = "chatllm.erased_digest"
"""Header of an event re-published from the archive after its content was erased: the
original payload's digest, which its hash in the audit chain is made of."""
DLQ_TRUNCATED = "chatllm.dlq.truncated"  # the original size, when the broker refused it whole
DLQ_SHA256 = "chatllm.dlq.sha256"  # the original bytes' digest, when truncated

SYSTEM_STREAM_PREFIXES = (
    "workflow:",
    "admin:",
    "anomaly:",
    "bus:",
    "config:",
    "kb:",
    "memory-prune:",
    "plugin:",
    "plugin-emit:",
)
"""Streams chat-llm writes for itself (workflow runs, operator actions, findings): a chat
context id may not start with one of these, nor with an ingest prefix."""

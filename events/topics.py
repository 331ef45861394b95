"""Topic names, defined once. Kafka key = stream_id, so a stream stays on one partition."""

EVENTS = "chatllm.events"
"""The event log: the source of truth."""

INGEST = "chatllm.ingest"
"""Where upstream systems produce; validated, then appended to EVENTS."""

DEADLETTER = "chatllm.deadletter"
"""What failed validation: the original bytes, with the reason in the headers. Never dropped."""

# Header names on dead-letter records (values are UTF-8).
DLQ_REASON = "chatllm.dlq.reason"
DLQ_SOURCE = "chatllm.dlq.source"  # "topic/partition/offset" of the original record
DLQ_PROCESSOR = "chatllm.dlq.processor"
DLQ_FAILED_AT = "chatllm.dlq.failed_at"

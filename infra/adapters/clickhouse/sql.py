"""The SQL and the table shapes that the migrations' views, the writes and the reads share:
the memory and analytics selects, the columns and row types of each projection table."""

from __future__ import annotations

from typing import Any

from streams.projections import (
    ANOMALIES_TABLE,
    ANOMALY_COLUMNS,
    FACT_COLUMNS,
    FACTS_TABLE,
    MEMORY_TYPES,
    PRUNE_COLUMNS,
    PRUNES_TABLE,
    AnomalyRow,
    FactRow,
    PruneRow,
)

MEMORY_TYPES_SQL = ", ".join(f"'{t}'" for t in MEMORY_TYPES)

MEMORY_COLUMNS = (
    "context_id",
    "conversation_id",
    "user_id",
    "started_at",
    "ended_at",
    "duration_ms",
    "question",
    "answer",
    "model",
    "status",
    "message_tokens",
    "prompt_tokens",
    "completion_tokens",
    "sentiment",
    "sentiment_label",
    "redacted",
)

MEMORY_FIELDS = ", ".join(f"m.{c} AS {c}" for c in MEMORY_COLUMNS)

# One conversation per (context, correlation id): the question, the answer and what the
# turn cost. `{where}` narrows the facts read (a tenant, a context).
MEMORY_SELECT = (
    "SELECT tenant_id, context_id, conversation_id,"
    " anyIf(user_id, type = 'MessageReceived') AS user_id,"
    " min(at) AS started_at, max(at) AS ended_at,"
    # Events of a turn are stamped together; the model's latency is most of its duration.
    " greatest(toFloat64(dateDiff('millisecond', min(at), max(at))),"
    " maxIf(latency_ms, type = 'ReplyCompleted')) AS duration_ms,"
    " argMaxIf(text, stream_version, type = 'MessageReceived' AND role = 'user') AS question,"
    " anyIf(text, type IN ('ReplyCompleted', 'ReplyFailed')) AS answer,"
    " anyIf(model, type IN ('ReplyCompleted', 'ReplyFailed')) AS model,"
    " multiIf(countIf(type = 'ReplyFailed') > 0, 'failed',"
    " countIf(type = 'ReplyCompleted') > 0, 'ok', 'open') AS status,"
    " sumIf(tokens, type = 'MessageReceived') AS message_tokens,"
    " sumIf(prompt_tokens, type = 'ReplyCompleted') AS prompt_tokens,"
    " sumIf(completion_tokens, type = 'ReplyCompleted') AS completion_tokens,"
    " avgIf(sentiment, type = 'SentimentScored') AS sentiment,"
    " argMaxIf(sentiment_label, stream_version, type = 'SentimentScored') AS sentiment_label,"
    " max(redacted) AS redacted"
    " FROM {db}.facts FINAL"
    f" WHERE type IN ({MEMORY_TYPES_SQL}) AND {{where}}"
    " GROUP BY tenant_id, context_id, conversation_id"
)

# Rollups per `{bucket}` over the facts selected by `{where}`.
ANALYTICS_SELECT = (
    "SELECT tenant_id, {bucket} AS bucket,"
    " countIf(type IN ('ReplyCompleted', 'ReplyFailed')"
    " OR (type = 'RateLimitChecked' AND status = 'denied')"
    " OR (type = 'InputChecked' AND status = 'block')) AS requests,"
    " countIf(type = 'ReplyCompleted') AS replies,"
    " quantileIf(0.5)(latency_ms, type = 'ReplyCompleted') AS latency_p50_ms,"
    " quantileIf(0.95)(latency_ms, type = 'ReplyCompleted') AS latency_p95_ms,"
    " quantileIf(0.99)(latency_ms, type = 'ReplyCompleted') AS latency_p99_ms,"
    " sumIf(prompt_tokens + completion_tokens, type = 'ReplyCompleted') AS tokens,"
    " countIf(type = 'ReplyFailed') AS errors,"
    " sumMapIf(map(error_class, toUInt64(1)), type = 'ModelCalled' AND error_class != '')"
    " AS errors_by_class,"
    " sumMapIf(map(model, toUInt64(1)), type = 'ReplyCompleted') AS models,"
    " countIf(type = 'ReplyCompleted' AND fallback = 1) AS fallbacks,"
    " countIf(type = 'RateLimitChecked' AND status = 'denied') AS denials,"
    " countIf(type = 'InputChecked' AND status = 'block') AS blocked,"
    " countIf(type = 'CircuitChanged' AND status = 'open') AS circuit_openings"
    " FROM {db}.facts FINAL WHERE {where}"
    " GROUP BY tenant_id, bucket ORDER BY tenant_id, bucket"
)

ROW_TYPES: dict[str, Any] = {
    FACTS_TABLE: FactRow,
    ANOMALIES_TABLE: AnomalyRow,
    PRUNES_TABLE: PruneRow,
}
COLUMNS: dict[str, tuple[str, ...]] = {
    FACTS_TABLE: FACT_COLUMNS,
    ANOMALIES_TABLE: ANOMALY_COLUMNS,
    PRUNES_TABLE: PRUNE_COLUMNS,
}
